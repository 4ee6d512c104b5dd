"""What a run actually uses, resolved once from its frozen arguments: recipe values, framework constants, the image
policy, the effective batch and learning rate. The engines print a plan, save it in ``training_args.json`` under
``"resolved"``, and read their values from it; the parsed arguments are never written to.

Precedence everywhere: an explicit flag, then the recipe (``--recipe``, else the one of the data's policy), then the
framework's default. Flags that do not apply to the chosen framework are refused before any data is loaded
(:func:`check_objective_flags`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .arguments import (
    BackboneArguments, FinetuneCommand, LinearEvalCommand, ObjectiveArguments, OptimizationArguments, PretrainCommand,
    SearchCommand,
)
from .backbones import backbone_config_values, is_torchvision_backbone
from .configuration_nasiam import FRAMEWORK_DEFAULTS, FRAMEWORKS, NASiamConfig
from .errors import UsageError
from .genotype_files import genotype_source_record, genotype_values
from .optimization import lars_class, scaled_lr
from .presets import RECIPE_NAMES, Recipe, recipe_for_policy, resolve_recipe
from .search_methods import SearchVariant

# Which frameworks each framework-specific flag applies to (the others would silently ignore it).
FLAG_FRAMEWORKS = {
    "temperature": ("simclr", "mocov2"),
    "queue_size": ("mocov2",),
    "momentum": ("mocov2", "byol"),
    "predictor_layers": ("simsiam", "byol"),
    "no_fix_predictor_lr": ("simsiam",),
    "off_diagonal_weight": ("barlowtwins",),
    "correlation_scale": ("barlowtwins",),
    "invariance_weight": ("vicreg",),
    "variance_weight": ("vicreg",),
    "covariance_weight": ("vicreg",),
    "projector_hidden_size": FRAMEWORKS,
    "projection_dim": FRAMEWORKS,
}


def check_objective_flags(objective: ObjectiveArguments, framework: str, **others: Any) -> None:
    """Refuse objective flags (and ``others`` given, e.g. ``predictor_layers=4``) that ``framework`` would ignore."""
    given = {**objective.given(), **{k: v for k, v in others.items() if v not in (None, False)}}
    for name in given:
        allowed = FLAG_FRAMEWORKS[name]
        if framework not in allowed:
            raise ValueError(f"--{name} does not apply to framework {framework!r}: it is used by "
                             f"{' and '.join(allowed)} only")


def recipe_name(requested: str | None, policy: str) -> str:
    """``--recipe``, else the recipe of the data's policy."""
    return requested or recipe_for_policy(policy)


@dataclass(frozen=True)
class LearningRate:
    """The rate a run uses and its rate per 256 images: ``lr = base_lr x global_batch / 256``. ``source`` says which
    one was set ("given": ``--learning_rate``; "base": ``--base_learning_rate`` or the recipe's) and which derived."""

    lr: float
    base_lr: float
    global_batch: int
    source: str

    def describe(self) -> str:
        if self.source == "given":
            return f"lr {self.lr:.4g} (given; base-equivalent {self.base_lr:.4g} per 256)"
        return f"effective lr {self.lr:.4g} (= base {self.base_lr:g} x {self.global_batch}/256)"


def resolve_learning_rate(learning_rate: float | None, base_learning_rate: float | None, default_base: float,
                          global_batch: int) -> LearningRate:
    """``--learning_rate`` as given, else ``--base_learning_rate`` (else ``default_base``) scaled by the global
    batch. The arguments refuse both at once (:func:`nasiam_hf.arguments.fields.check_learning_rates`)."""
    if learning_rate is not None:
        return LearningRate(learning_rate, learning_rate * 256 / global_batch, global_batch, "given")
    base = base_learning_rate if base_learning_rate is not None else default_base
    return LearningRate(scaled_lr(base, global_batch), base, global_batch, "base")


@dataclass(frozen=True)
class OptimizationPlan:
    """The weight optimisation of a run: batch, updates, learning rate (``lr`` is the rate used; ``base_lr`` the
    rate per 256 images, given or derived, as ``lr_source`` says)."""

    recipe: str | None
    per_device_batch: int
    num_processes: int
    accumulation: int
    global_batch: int
    base_lr: float
    lr: float
    lr_source: str
    weight_decay: float
    epochs: int | None
    max_train_steps: int | None
    warmup_epochs: float
    max_grad_norm: float | None
    momentum: float = 0.9
    optimizer: str = "sgd"
    trust_coefficient: float | None = None
    trust_clip: bool | None = None

    def describe(self) -> str:
        batch = f"global batch {self.global_batch}"
        if self.accumulation > 1 or self.num_processes > 1:
            batch += f" (= {self.per_device_batch} per device x {self.num_processes} processes x {self.accumulation}" \
                     " accumulated)"
        optimizer = "SGD"
        if self.optimizer == "lars":
            optimizer = (f"LARS (trust coefficient {self.trust_coefficient:g}"
                         + (", clipped" if self.trust_clip else "")
                         + "; biases and norm parameters not adapted, no weight decay)")
        rate = LearningRate(self.lr, self.base_lr, self.global_batch, self.lr_source).describe()
        return (f"{batch}, {optimizer}, {rate}, weight decay {self.weight_decay:g}"
                + (f", recipe {self.recipe}" if self.recipe else ""))

    def total_steps(self, feed) -> int:
        """Optimizer updates of the whole run: ``--max_train_steps``, else the updates of the epochs of ``feed``
        (:mod:`nasiam_hf.feeds`). A run whose epochs hold no update (an accumulation longer than an epoch) is
        refused here, before training: it would turn over empty epochs forever."""
        for epoch in range(self.epochs or 1):
            problem = feed.no_update_reason(epoch)
            if problem is not None:
                raise UsageError(problem)
        if self.max_train_steps is not None:
            return self.max_train_steps
        total = feed.total_updates(self.epochs) if self.epochs is not None else None
        if total is None:
            raise ValueError("the length of the streamed training data is unknown (its shards are not counted): "
                             "pass --max_train_steps (optimizer updates), and --knn_every / --checkpointing_steps "
                             "in steps ('500steps', '1000') if you want them")
        return total


def optimization_plan(opt: OptimizationArguments, num_processes: int, recipe: str | None, *, batch_size: int,
                      base_lr: float, weight_decay: float, epochs: int | None, warmup_epochs: float = 0.0,
                      momentum: float = 0.9, optimizer: str = "sgd", trust_coefficient: float | None = None,
                      trust_clip: bool | None = None) -> OptimizationPlan:
    """Flags over the recipe's values. The recipe's ``batch_size`` is global: without
    ``--per_device_train_batch_size`` it is divided over the processes and the accumulation steps; its ``base_lr``
    is per 256 images of the global batch. ``--optimizer`` over the recipe's; LARS takes the recipe's trust
    coefficient and clipping when the recipe trains with LARS, else timm's defaults (0.001, no clipping)."""
    chosen = opt.optimizer or optimizer
    if chosen != "lars":
        trust_coefficient = trust_clip = None
    elif optimizer != "lars" or trust_coefficient is None:
        trust_coefficient, trust_clip = 0.001, False
    accumulation = opt.gradient_accumulation_steps
    batch = opt.per_device_train_batch_size or max(1, batch_size // (num_processes * accumulation))
    global_batch = batch * num_processes * accumulation
    rate = resolve_learning_rate(opt.learning_rate, opt.base_learning_rate, base_lr, global_batch)
    return OptimizationPlan(
        recipe=recipe, per_device_batch=batch, num_processes=num_processes, accumulation=accumulation,
        global_batch=global_batch, base_lr=rate.base_lr, lr=rate.lr, lr_source=rate.source,
        weight_decay=opt.weight_decay if opt.weight_decay is not None else weight_decay,
        epochs=opt.num_train_epochs if opt.num_train_epochs is not None else epochs,
        max_train_steps=opt.max_train_steps,
        warmup_epochs=opt.num_warmup_epochs if opt.num_warmup_epochs is not None else warmup_epochs,
        max_grad_norm=opt.max_grad_norm, momentum=momentum, optimizer=chosen, trust_coefficient=trust_coefficient,
        trust_clip=trust_clip,
    )


@dataclass(frozen=True)
class SearchPlan:
    """A search: the supernet's config, the weight optimisation and the alpha optimiser."""

    config: dict[str, Any]
    optimization: OptimizationPlan
    fix_predictor_lr: bool
    train_portion: float
    arch_optimizer: str
    arch_lr: float
    arch_betas: tuple[float, float]
    arch_weight_decay: float
    variant: SearchVariant

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def backbone_values(model: BackboneArguments, cache_dir: str | None = None) -> dict[str, Any]:
    """Config values of ``--backbone`` / ``--backbone_kwargs`` (empty when no backbone is given: the genotype's);
    reads a transformers config folder or Hub id, so a bad value fails before any data is loaded."""
    if model.backbone is None:
        if model.backbone_kwargs is not None:
            raise ValueError("--backbone_kwargs needs --backbone (the timm model it configures)")
        return {}
    if model.backbone_kwargs is not None and is_torchvision_backbone(model.backbone):
        raise ValueError(f"--backbone_kwargs applies to timm (timm/<name>) and transformers backbones only, not to "
                         f"the torchvision --backbone {model.backbone!r}")
    return backbone_config_values(model.backbone, model.kwargs, cache_dir=cache_dir)


def check_backbone_weights(model: BackboneArguments, backbone: str) -> None:
    """``--backbone_weights`` of the kind ``backbone`` can take, checked without reading or downloading anything;
    ``--no_zero_init_residual`` only where the package initialises the trunk (the torchvision ResNets)."""
    if model.no_zero_init_residual and not is_torchvision_backbone(backbone):
        raise ValueError(f"--no_zero_init_residual applies to the torchvision ResNets (resnet18|resnet34|resnet50) "
                         f"only; backbone {backbone!r} keeps its library's own initialisation")
    if model.backbone_weights is not None:
        from .backbone_weights import check_weights_spec

        check_weights_spec(model.backbone_weights, backbone)


def check_optimizer_available(opt: OptimizationArguments, recipe: str | None, framework: str) -> None:
    """Before any data: LARS needs timm, whether ``--optimizer lars`` asks for it or the recipe (the given one, else
    either of the framework's) trains with it; a one-line error names the install."""
    if opt.optimizer == "lars":
        lars_class()
    elif opt.optimizer is None:
        names = [recipe] if recipe is not None else list(RECIPE_NAMES)
        if any(resolve_recipe(name, framework).optimizer == "lars" for name in names):
            lars_class(f"the {framework} recipe (LARS; --optimizer sgd to train without it)")


def recipe_optimizer(recipe: Recipe, search: bool = False) -> dict[str, Any]:
    """The keyword arguments of :func:`optimization_plan` that name the recipe's weight optimiser."""
    return dict(optimizer=recipe.search.optimizer if search else recipe.optimizer,
                trust_coefficient=recipe.lars_trust_coefficient, trust_clip=recipe.lars_trust_clip)


def check_search_flags(command: SearchCommand) -> dict[str, Any]:
    """Before any data: flags that the chosen framework would ignore; returns the backbone's config values."""
    s = command.search
    check_objective_flags(command.objective, s.framework, predictor_layers=s.predictor_layers)
    check_optimizer_available(command.optimization, s.recipe, s.framework)
    values = backbone_values(command.model, command.data.cache_dir)
    check_backbone_weights(command.model, command.model.backbone)
    return values


def plan_search(command: SearchCommand, policy: str, image_size: int, num_processes: int,
                backbone_values: dict[str, Any] | None = None) -> SearchPlan:
    """The search of ``command`` on data of ``policy`` at ``image_size``, on ``num_processes`` processes."""
    s = command.search
    name = recipe_name(s.recipe, policy)
    recipe = resolve_recipe(name, s.framework)
    block = recipe.search
    config = dict(framework=s.framework, image_size=image_size, search_space=s.search_space,
                  **(backbone_values or {"backbone": command.model.backbone}))
    if is_torchvision_backbone(config["backbone"]):
        config["cifar_stem"] = policy == "cifar"
        config["zero_init_residual"] = recipe.zero_init_residual and not command.model.no_zero_init_residual
    if s.projector_layers is not None:
        config["projector_layers"] = s.projector_layers
    if FRAMEWORK_DEFAULTS[s.framework]["predictor_layers"] and s.predictor_layers is not None:
        config["predictor_layers"] = s.predictor_layers
    config.update({**recipe.head_values(), **recipe.method_values(), **command.objective.given()})
    if recipe.key_bn_splits and s.framework == "mocov2":
        config["key_bn_splits"] = recipe.key_bn_splits
    NASiamConfig(**config)  # validates the combination before anything is built
    return SearchPlan(
        config=config,
        optimization=optimization_plan(command.optimization, num_processes, name, batch_size=block.batch_size,
                                       base_lr=block.base_lr, weight_decay=block.weight_decay, epochs=block.epochs,
                                       momentum=block.momentum, **recipe_optimizer(recipe, search=True)),
        fix_predictor_lr=block.fix_predictor_lr,
        train_portion=s.train_portion if s.train_portion is not None else block.train_portion,
        arch_optimizer=block.arch_optimizer,
        arch_lr=s.arch_learning_rate if s.arch_learning_rate is not None else block.arch_lr,
        arch_betas=tuple(block.arch_betas),
        arch_weight_decay=s.arch_weight_decay if s.arch_weight_decay is not None else block.arch_weight_decay,
        variant=s.variant(),
    )


@dataclass(frozen=True)
class PretrainPlan:
    """A pretraining: the model's config, the weight optimisation and SimSiam's fixed predictor lr."""

    config: dict[str, Any]
    optimization: OptimizationPlan
    fix_predictor_lr: bool
    key_bn_splits: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_pretrain_flags(command: PretrainCommand) -> dict[str, Any]:
    """Before any data: refuse the flags the genotype's framework would ignore; returns the backbone's config
    values (empty: the genotype's backbone)."""
    genotype = genotype_values(command.pretrain.genotype)
    check_objective_flags(command.objective, genotype["framework"],
                          no_fix_predictor_lr=command.pretrain.no_fix_predictor_lr)
    check_optimizer_available(command.optimization, command.pretrain.recipe, genotype["framework"])
    values = backbone_values(command.model, command.data.cache_dir)
    # the --backbone, else the genotype's, else NASiamConfig's default (a baseline preset names none)
    check_backbone_weights(command.model, values.get("backbone") or genotype.get("backbone") or "resnet18")
    return values


def plan_pretrain(command: PretrainCommand, policy: str, image_size: int, num_processes: int,
                  backbone_values: dict[str, Any] | None = None) -> PretrainPlan:
    """The pretraining of ``command`` on data of ``policy`` at ``image_size``, on ``num_processes`` processes."""
    values = genotype_values(command.pretrain.genotype)
    framework = values["framework"]
    name = recipe_name(command.pretrain.recipe, policy)
    recipe = resolve_recipe(name, framework)
    if backbone_values and backbone_values.get("backbone") != values.get("backbone"):
        values.pop("projector_hidden_size", None)  # re-derive the width of the new backbone
        for key in ("backbone", "backbone_kwargs", "backbone_config", "cifar_stem"):
            values.pop(key, None)
    values.update(backbone_values or {})
    values["image_size"] = image_size
    if is_torchvision_backbone(values.get("backbone", "resnet18")):
        values["cifar_stem"] = policy == "cifar"
        values["zero_init_residual"] = recipe.zero_init_residual and not command.model.no_zero_init_residual
    for key, width in recipe.head_values().items():  # the genotype's own widths (a search output's) win
        if values.get(key) is None:
            values[key] = width
    values.update({**recipe.method_values(), **command.objective.given()})
    if recipe.key_bn_splits and framework == "mocov2":
        values["key_bn_splits"] = recipe.key_bn_splits
    NASiamConfig(**values)
    return PretrainPlan(
        config=values,
        optimization=optimization_plan(command.optimization, num_processes, name, batch_size=recipe.batch_size,
                                       base_lr=recipe.base_lr, weight_decay=recipe.weight_decay, epochs=recipe.epochs,
                                       warmup_epochs=recipe.warmup_epochs, momentum=recipe.momentum,
                                       **recipe_optimizer(recipe)),
        fix_predictor_lr=recipe.fix_predictor_lr and not command.pretrain.no_fix_predictor_lr,
        key_bn_splits=recipe.key_bn_splits,
    )


@dataclass(frozen=True)
class FinetunePlan:
    optimization: OptimizationPlan
    classifier_lr_multiplier: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_finetune(command: FinetuneCommand, num_processes: int) -> FinetunePlan:
    opt = command.optimization
    if opt.optimizer == "lars":
        lars_class()
    plan = optimization_plan(opt, num_processes, None, batch_size=opt.per_device_train_batch_size,
                             base_lr=opt.default_base_learning_rate, weight_decay=opt.weight_decay,
                             epochs=opt.num_train_epochs)
    return FinetunePlan(plan, opt.classifier_lr_multiplier)


@dataclass(frozen=True)
class LinearEvalPlan:
    """The probe: recipe values under the flags. Its global batch is known once the labelled set is (a small set is
    used whole), so the rate is resolved then: ``lr`` as given, else ``base_lr`` scaled (:meth:`learning_rate`)."""

    recipe: str
    epochs: int
    per_device_batch: int
    lr: float | None
    base_lr: float
    weight_decay: float
    momentum: float
    feature_norm: str

    def learning_rate(self, global_batch: int) -> LearningRate:
        return resolve_learning_rate(self.lr, None, self.base_lr, global_batch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The official probes train on raw features at 30 per 256 images (SimSiam's CIFAR probe); the recipes' rate is for
# batch-normalised features.
RAW_FEATURE_PROBE_BASE_LR = 30.0


def plan_linear_eval(command: LinearEvalCommand, policy: str, framework: str) -> LinearEvalPlan:
    """Probe values from ``--recipe`` (else the data's policy) for ``framework``, under the flags."""
    probe = command.probe
    name = recipe_name(probe.recipe, policy)
    block = resolve_recipe(name, framework).probe
    feature_norm = probe.feature_norm or block.feature_norm
    default_base = block.base_lr if feature_norm == block.feature_norm else RAW_FEATURE_PROBE_BASE_LR
    return LinearEvalPlan(
        recipe=name,
        epochs=probe.num_train_epochs if probe.num_train_epochs is not None else block.epochs,
        per_device_batch=probe.per_device_train_batch_size or block.batch_size, lr=probe.learning_rate,
        base_lr=probe.base_learning_rate if probe.base_learning_rate is not None else default_base,
        weight_decay=probe.weight_decay if probe.weight_decay is not None else block.weight_decay,
        momentum=block.momentum, feature_norm=feature_norm,
    )


__all__ = [
    "FinetunePlan",
    "LearningRate",
    "LinearEvalPlan",
    "OptimizationPlan",
    "PretrainPlan",
    "SearchPlan",
    "check_backbone_weights",
    "check_optimizer_available",
    "check_objective_flags",
    "check_pretrain_flags",
    "check_search_flags",
    "genotype_source_record",
    "genotype_values",
    "optimization_plan",
    "plan_finetune",
    "plan_linear_eval",
    "plan_pretrain",
    "plan_search",
    "resolve_learning_rate",
]
