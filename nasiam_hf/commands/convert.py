"""``nasiam-convert``: export a NASiam backbone to torchvision or detectron2, import the authors' checkpoints, or turn
a training checkpoint into a model folder.

    nasiam-convert torchvision runs/model resnet18.safetensors
    nasiam-convert detectron2 runs/r50-model r50.pkl
    nasiam-convert official checkpoint_0799.pth.tar runs/imported --genotype cifar10_resnet18.txt
    nasiam-convert checkpoint runs/pretrain/checkpoints/step-00001200 runs/pretrain-step1200

Every subcommand checks its inputs first and ends a failure with one ``error: ...`` line (exit status 2 for bad
input, a mistyped subcommand or flag included); ``--debug`` (or ``NASIAM_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

from ..arguments.parsing import OneLineArgumentParser
from ..errors import UsageError, run_entry_point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="Show the traceback of an error.")
    parser = OneLineArgumentParser(prog="nasiam-convert", description="Convert NASiam models to and from other "
                                   "formats.", parents=[common], allow_abbrev=False)
    sub = parser.add_subparsers(dest="target", required=True)
    tv = sub.add_parser("torchvision", parents=[common],
                        help="Backbone -> torchvision ResNet state dict (safetensors, no fc).")
    tv.add_argument("model", help="A NASiam model folder.")
    tv.add_argument("output", help="The .safetensors file to write.")
    d2 = sub.add_parser("detectron2", parents=[common], help="Backbone -> detectron2 weights (.pkl for MODEL.WEIGHTS).")
    d2.add_argument("model", help="A NASiam model folder (ImageNet stem).")
    d2.add_argument("output", help="The .pkl file to write.")
    d2.add_argument("--allow_cifar_stem", action="store_true", help="Export a CIFAR-stem backbone anyway.")
    off = sub.add_parser("official", parents=[common],
                         help="Checkpoint of the authors' code (.pth.tar) -> NASiam model folder.")
    off.add_argument("checkpoint", help="The .pth.tar file (read with torch.load(weights_only=True)).")
    off.add_argument("output", help="The model folder to write.")
    off.add_argument("--genotype", default=None, help="The matching genotype file of the official repository.")
    off.add_argument("--framework", choices=["simsiam", "mocov2", "simclr"], default=None,
                     help="Default: recognised from the checkpoint's keys.")
    ck = sub.add_parser("checkpoint", parents=[common],
                        help="Training checkpoint (output_dir/checkpoints/step-N) -> model folder (pretraining, "
                             "fine-tuning) or genotype folder (search).")
    ck.add_argument("checkpoint", help="A checkpoint folder written by nasiam-pretrain, -finetune or -search.")
    ck.add_argument("output", help="The folder to write (new, empty, or holding a NASiam model to replace).")
    return parser.parse_args(argv)


def _output_file(path: str, what: str) -> None:
    if Path(path).is_dir():
        raise UsageError(f"OUTPUT {path!r} is a folder: give the {what} file to write, e.g. {Path(path) / 'x'}")
    parent = Path(path).parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"OUTPUT {path!r} cannot be written: {str(parent)!r} is a file")


def run(args: argparse.Namespace) -> str:
    """Carry out one subcommand; returns what to print."""
    from ..folders import FolderKind, inspect_path, require_model, require_model_output

    if args.target == "checkpoint":
        from ..export import export_checkpoint

        return export_checkpoint(args.checkpoint, args.output)
    if args.target in ("torchvision", "detectron2"):
        require_model(args.model, flag="MODEL", purpose=f"the {args.target} export", allow_hub_id=False)
        _output_file(args.output, ".safetensors" if args.target == "torchvision" else ".pkl")
        from .. import export

        if args.target == "torchvision":
            path = export.export_torchvision(args.model, args.output)
            return f"wrote {path}: {export.read_torchvision_metadata(path)['note']}"
        return f"wrote {export.export_detectron2(args.model, args.output, allow_cifar_stem=args.allow_cifar_stem)}"
    source = inspect_path(args.checkpoint)
    if source.kind is not FolderKind.FILE:
        raise UsageError(f"CHECKPOINT {args.checkpoint!r} must be a .pth.tar file of the authors' code, but it is "
                         f"{source.what}")
    if args.genotype is not None and not Path(args.genotype).is_file():
        raise UsageError(f"--genotype {args.genotype!r} must be a genotype file of the official repository, but it "
                         f"is {inspect_path(args.genotype).what}")
    require_model_output(args.output)
    from ..fileio import staged_files
    from ..official import load_official_checkpoint
    from ..processing import image_processor_for_config

    try:
        model = load_official_checkpoint(args.checkpoint, genotype=args.genotype, framework=args.framework)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise UsageError(f"CHECKPOINT {args.checkpoint!r} cannot be read as a checkpoint of the authors' code "
                         f"({' '.join(str(error).split())[:200]})") from error
    with staged_files(args.output) as staged:
        model.save_pretrained(staged)
        image_processor_for_config(model.config).save_pretrained(staged)
    return (f"wrote {args.output} ({model.config.framework}, {model.config.backbone}); the image processor uses "
            f"default {'CIFAR-10' if model.config.cifar_stem else 'ImageNet'} statistics: check them")


def main(argv: list[str] | None = None) -> None:
    run_entry_point(lambda arguments: print(run(parse_args(arguments))), argv)


if __name__ == "__main__":
    main()
