"""The paper's discovered genotypes, each framework's standard heads, and the training recipes, by name.

Plain data only: :meth:`NASiamConfig.from_preset` and the training scripts read these tables.
"""

from __future__ import annotations

# Genotypes found by the paper's authors (their official repository's genotype files), searched on CIFAR.
PAPER_PRESETS: dict[str, dict] = {
    "simsiam-cifar10-resnet18": {
        "framework": "simsiam",
        "backbone": "resnet18",
        "projector_genotype": ["linear_relu", "linear_silu", "linear_elu", "identity", "identity", "linear_relu"],
        "predictor_genotype": ["linear_hardswish", "avg_pool_3x3", "avg_pool_3x3", "linear_hardswish"],
    },
    "simsiam-cifar10-resnet50": {
        "framework": "simsiam",
        "backbone": "resnet50",
        "projector_genotype": [
            "linear_silu", "linear_hardswish", "linear_hardswish", "linear_hardswish", "linear_silu", "linear_silu",
        ],
        "predictor_genotype": ["linear_hardswish", "linear_hardswish", "avg_pool_3x3", "linear_silu"],
    },
    "simsiam-cifar100-resnet50": {
        "framework": "simsiam",
        "backbone": "resnet50",
        "projector_genotype": ["identity", "linear_silu", "linear_silu", "linear_elu", "linear_silu", "linear_elu"],
        "predictor_genotype": ["linear_elu", "linear_elu", "linear_elu", "linear_hardswish"],
    },
    "mocov2-cifar10-resnet18": {
        "framework": "mocov2",
        "backbone": "resnet18",
        "projector_genotype": ["avg_pool_3x3", "avg_pool_3x3", "avg_pool_3x3", "avg_pool_3x3"],
    },
    "mocov2-cifar10-resnet50": {
        "framework": "mocov2",
        "backbone": "resnet50",
        "projector_genotype": ["identity", "avg_pool_3x3", "avg_pool_3x3", "avg_pool_3x3"],
    },
    "simclr-cifar10-resnet50": {
        "framework": "simclr",
        "backbone": "resnet50",
        "projector_genotype": [
            "linear_hardswish", "linear_hardswish", "avg_pool_3x3", "linear_relu", "linear_relu", "linear_relu",
        ],
    },
}

# Each framework's standard heads, written as genotypes of the same head code (backbone left to the caller).
BASELINE_PRESETS: dict[str, dict] = {
    # SimSiam (CIFAR variant): 2-layer projector at backbone width + Linear/BN(affine=False) to 2048;
    # predictor 2048 -> 512 -> 2048.
    "simsiam-baseline": {
        "framework": "simsiam",
        "projector_layers": 2,
        "projector_genotype": ["linear_relu", "linear_relu"],
        "predictor_layers": 2,
        "predictor_genotype": ["linear_relu", "linear_relu"],
    },
    # SimCLR: 2048-2048-128 MLP with BN (SimCLR v2 style), no BN or ReLU on the output.
    "simclr-baseline": {
        "framework": "simclr",
        "projector_layers": 3,
        "projector_hidden_size": 2048,
        "projector_genotype": ["linear_relu", "linear_relu", "linear_relu"],
    },
    # MoCo v2: Linear + ReLU at backbone width, then Linear to 128 (BN added, as in our linear op).
    "mocov2-baseline": {
        "framework": "mocov2",
        "projector_layers": 1,
        "projector_genotype": ["linear_relu"],
    },
    # BYOL: projector and predictor Linear(4096) + BN + ReLU + Linear(256).
    "byol-baseline": {
        "framework": "byol",
        "projector_layers": 1,
        "projector_hidden_size": 4096,
        "projector_genotype": ["linear_relu"],
        "predictor_layers": 2,
        "predictor_hidden_size": 4096,
        "predictor_genotype": ["linear_relu", "linear_relu"],
    },
}

PRESETS: dict[str, dict] = {**PAPER_PRESETS, **BASELINE_PRESETS}

# Training recipes (DESIGN.md facts). lr is the base rate for a batch of 256, scaled linearly by global batch / 256.
RECIPES: dict[str, dict] = {
    "cifar": {
        "image_size": 32,
        "cifar_stem": True,
        "search": {"epochs": 100, "batch_size": 512, "lr": 0.06, "momentum": 0.9, "weight_decay": 5e-4},
        "pretrain": {
            "epochs": 800, "batch_size": 512, "lr": 0.06, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 0,
        },
        "linear_eval": {"epochs": 100, "batch_size": 256, "lr": 30.0, "weight_decay": 0.0},
        "mocov2": {"queue_size": 4096, "momentum": 0.99, "temperature": 0.1},
        "simclr": {"temperature": 0.5},
        "byol": {"momentum": 0.99},
    },
    "imagenet": {
        "image_size": 224,
        "cifar_stem": False,
        "search": {"epochs": 100, "batch_size": 512, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "pretrain": {
            "epochs": 100, "batch_size": 512, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 0,
        },
        "linear_eval": {"epochs": 90, "batch_size": 4096, "lr": 0.1, "weight_decay": 0.0},
        "mocov2": {"queue_size": 65536, "momentum": 0.999, "temperature": 0.2, "lr": 0.03, "epochs": 200},
        "simclr": {"temperature": 0.5},
        "byol": {"momentum": 0.99},
    },
}
