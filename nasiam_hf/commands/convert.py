"""``nasiam-convert``: export a NASiam backbone to torchvision or detectron2, or import the authors' checkpoints.

    nasiam-convert torchvision runs/model resnet18.safetensors
    nasiam-convert detectron2 runs/r50-model r50.pkl
    nasiam-convert official checkpoint_0799.pth.tar runs/imported --genotype cifar10_resnet18.txt
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert NASiam backbones to and from other formats.")
    sub = parser.add_subparsers(dest="target", required=True)
    tv = sub.add_parser("torchvision", help="Backbone -> torchvision ResNet state dict (safetensors, no fc).")
    tv.add_argument("model", help="A NASiam model folder.")
    tv.add_argument("output", help="The .safetensors file to write.")
    d2 = sub.add_parser("detectron2", help="Backbone -> detectron2 weights (.pkl for MODEL.WEIGHTS).")
    d2.add_argument("model", help="A NASiam model folder (ImageNet stem).")
    d2.add_argument("output", help="The .pkl file to write.")
    d2.add_argument("--allow_cifar_stem", action="store_true", help="Export a CIFAR-stem backbone anyway.")
    off = sub.add_parser("official", help="Checkpoint of the authors' code (.pth.tar) -> NASiam model folder.")
    off.add_argument("checkpoint", help="The .pth.tar file (read with torch.load(weights_only=True)).")
    off.add_argument("output", help="The model folder to write.")
    off.add_argument("--genotype", default=None, help="The matching genotype file of the official repository.")
    off.add_argument("--framework", choices=["simsiam", "mocov2", "simclr"], default=None,
                     help="Default: recognised from the checkpoint's keys.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from .. import export

    if args.target == "torchvision":
        path = export.export_torchvision(args.model, args.output)
        print(f"wrote {path}: {export.read_torchvision_metadata(path)['note']}")
    elif args.target == "detectron2":
        print(f"wrote {export.export_detectron2(args.model, args.output, allow_cifar_stem=args.allow_cifar_stem)}")
    else:
        from ..processing import image_processor_for_config

        model = export.load_official_checkpoint(args.checkpoint, genotype=args.genotype, framework=args.framework)
        model.save_pretrained(args.output)
        image_processor_for_config(model.config).save_pretrained(args.output)
        print(f"wrote {args.output} ({model.config.framework}, {model.config.backbone}); the image processor uses "
              f"default {'CIFAR-10' if model.config.cifar_stem else 'ImageNet'} statistics: check them")


if __name__ == "__main__":
    main()
