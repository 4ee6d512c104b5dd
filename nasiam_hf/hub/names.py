"""Display names shared by the card and the diagram, and the paper's citation."""

from __future__ import annotations

PAPER_ARXIV_ID = "2302.00059"
PAPER_TITLE = "NASiam: Efficient Representation Learning using Neural Architecture Search for Siamese Networks"
CITATION = """@article{heuillet2023nasiam,
  title={NASiam: Efficient Representation Learning using Neural Architecture Search for Siamese Networks},
  author={Heuillet, Alexandre and Tabia, Hedi and Arioui, Hichem},
  journal={arXiv preprint arXiv:2302.00059},
  year={2023}
}"""

FRAMEWORK_NAMES = {"simsiam": "SimSiam", "simclr": "SimCLR", "mocov2": "MoCo v2", "byol": "BYOL",
                   "barlowtwins": "Barlow Twins", "vicreg": "VICReg"}
BACKBONE_NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50"}
OUTPUT_LAYER_NAMES = {"linear_bn": "Linear + BN(affine=False)", "linear": "Linear",
                      "linear_no_bias": "Linear (no bias)"}

DATASET_PRETTY_NAMES = {
    "uoft-cs/cifar10": "CIFAR-10", "uoft-cs/cifar100": "CIFAR-100", "ILSVRC/imagenet-1k": "ImageNet-1k",
}
