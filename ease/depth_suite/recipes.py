"""The depth suite's settings and its five training recipes, all on one 12-layer shape.

- ``standard``: :class:`StandardTransformer`, loss on the last layer only;
- ``deep_supervision``: every layer's exit, uniform weights;
- ``asymmetric``: the SPEC's example generalised to the depth
  (:func:`ease.experiments.asymmetric_options`: 0.7 on layer 1, 0.3 on the last,
  learning-rate scales falling linearly from 1.0 to 0.1);
- ``layerskip``: LayerSkip's recipe (Elhoushi et al. 2024): loss weights growing as
  ``1 + 2 + ... + l`` (its ``e_scale``), layer dropout growing exponentially with depth to
  0.2 at the last layer, and the rotational early-exit curriculum;
- ``l3t``: this project's recipe, the three options and dropout together: half the loss
  on the last layer (so final-layer quality stays near standard's), the other half
  spread evenly over the layers generation may exit at (from ``min_exit_layer``);
  learning-rate scales falling linearly from 1.0 at layer 1 to 0.7 at the last (the
  early layers serve every exit and the last, the deep ones only the last few); linear
  layer dropout to 0.1.

Every recipe trains for the same step budget (so the same tokens) with the same seed,
schedule (cosine after warmup) and data order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ease.config import TrainingConfig
from ease.experiments import asymmetric_options
from ease.models import DeepSupervisionTransformer, EarlyExitDecoder, StandardTransformer
from ease.training.curriculum import depth_loss_weights
from ease.validation import check_int, check_real

__all__ = ["GPU_PRESET", "RECIPES", "DepthSuiteSettings", "Recipe", "build_recipes", "check_suite_settings"]

RECIPES = ("standard", "deep_supervision", "asymmetric", "layerskip", "l3t")
"""The recipes of the suite, in the order they are trained and reported."""


@dataclass
class DepthSuiteSettings:
    """Knobs of one depth-suite run (the ``--suite depth`` flags). The defaults are the
    CPU run: 53 minutes measured on a shared 2-core machine (one torch thread) for the five recipes."""

    out: str = "runs/depth_suite"
    corpus: str = "stdlib"
    vocab_size: int = 2048
    dim: int = 128
    num_layers: int = 12
    num_heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    max_steps: int = 400
    warmup_steps: int = 40
    eval_every: int = 200
    eval_batches: int = 24  # validation batches per evaluation, calibration and check (each)
    min_exit_layer: int = 2
    targets: tuple[float, ...] = (0.9, 0.95, 0.99)  # decision agreements the exit thresholds are calibrated for
    confidence: float = 0.9  # 1 - delta of the calibrated agreement bound
    prompts: int = 8
    prompt_len: int = 32
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 3
    draft_tokens: int = 4
    classifier_batches: int = 40
    seed: int = 0
    recipes: tuple[str, ...] = RECIPES
    retrain: bool = False  # train even where the output folder holds a model trained with these settings
    verbose: bool = True
    device: str = "cpu"
    extra: dict = field(default_factory=dict)  # free-form notes recorded in results.json (e.g. the preset)


GPU_PRESET = {
    "dim": 512, "num_heads": 8, "vocab_size": 8192, "seq_len": 256, "batch_size": 32, "lr": 1e-3,
    "max_steps": 1200, "warmup_steps": 100, "eval_every": 300, "eval_batches": 40, "device": "cuda",
    "repeats": 5, "classifier_batches": 100,
}
"""``--gpu``: sized for one H100/H200 in about 10 minutes (a prediction: not yet run on one)."""


def check_suite_settings(settings: DepthSuiteSettings) -> DepthSuiteSettings:
    """Check every setting before anything is loaded or written.

    Raises:
        ValueError: naming the flag, for a size, rate or count out of range, an unknown
            recipe, a target outside (0, 1), fewer than 3 layers, or a CUDA device
            (``--gpu``) that torch does not see.
    """
    for name in ("dim", "num_heads", "seq_len", "batch_size", "max_steps", "eval_every", "eval_batches",
                 "prompts", "prompt_len", "new_tokens", "repeats", "draft_tokens", "classifier_batches"):
        check_int("--" + name.replace("_", "-"), getattr(settings, name), 1)
    check_int("--num-layers", settings.num_layers, 3, expected="an integer >= 3 (a middle layer to exit at)")
    check_int("--vocab-size", settings.vocab_size, 257, expected="an integer >= 257 (256 bytes + end of text)")
    check_int("--warmup-steps", settings.warmup_steps, 0)
    check_int("--seed", settings.seed, 0)
    check_int("--min-exit-layer", settings.min_exit_layer, 1, settings.num_layers - 1)
    check_real("--lr", settings.lr, 0.0, above=True, expected="a finite number > 0")
    check_real("--confidence", settings.confidence, 0.0, 1.0, above=True, below=True)
    for target in settings.targets:
        check_real("--targets", target, 0.0, 1.0, above=True, below=True)
    if not settings.targets:
        raise ValueError("--targets must name at least one agreement")
    for batch in settings.batch_sizes:
        check_int("--batch-sizes", batch, 1)
    unknown = [name for name in settings.recipes if name not in RECIPES]
    if unknown or not settings.recipes:
        raise ValueError(f"--recipes must name some of {','.join(RECIPES)}, got {','.join(settings.recipes) or 'none'}")
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--gpu asks for a CUDA device, but torch sees none")
    if settings.prompt_len + settings.new_tokens > 1024:
        raise ValueError("--prompt-len plus --new-tokens must be at most 1024 (the models' positions)")
    return settings


@dataclass(frozen=True)
class Recipe:
    """One row of the suite: a name, the model class and how it trains."""

    name: str
    model_class: type[EarlyExitDecoder]
    config: TrainingConfig

    def describe(self) -> dict:
        """The recipe's options, for results.json."""
        c = self.config
        return {
            "model_class": self.model_class.__name__,
            "layer_weights": {str(k): round(v, 6) for k, v in (c.layer_weights or {}).items()},
            "layer_lr_scales": {str(k): v for k, v in (c.layer_lr_scales or {}).items()},
            "layer_dropout": c.layer_dropout, "layer_dropout_shape": c.layer_dropout_shape,
            "exit_curriculum": c.exit_curriculum, "curriculum_period": c.curriculum_period,
        }


def l3t_options(num_layers: int, min_exit_layer: int) -> tuple[dict[int, float], dict[int, float]]:
    """The ``l3t`` recipe's weights and learning-rate scales (see the module docstring)."""
    exits = range(min_exit_layer, num_layers)
    weights = {layer: 0.5 / len(exits) for layer in exits}
    weights[num_layers] = 0.5
    scales = {layer: round(1.0 - 0.3 * (layer - 1) / (num_layers - 1), 4) for layer in range(1, num_layers + 1)}
    return weights, scales


def build_recipes(settings: DepthSuiteSettings) -> list[Recipe]:
    """The recipes ``settings.recipes`` names, in :data:`RECIPES` order, each with its config."""
    layers = settings.num_layers
    common = TrainingConfig(
        seed=settings.seed, verbose=settings.verbose, lr_schedule="cosine", warmup_steps=settings.warmup_steps,
        min_lr_ratio=0.1, max_steps=settings.max_steps, eval_every=settings.eval_every,
        min_exit_layer=settings.min_exit_layer,
    )
    asym_weights, asym_scales = asymmetric_options(layers)
    l3t_weights, l3t_scales = l3t_options(layers, settings.min_exit_layer)
    recipes = {
        "standard": (StandardTransformer, replace(common, layer_weights={layers: 1.0})),
        "deep_supervision": (DeepSupervisionTransformer, replace(common, layer_weights=depth_loss_weights(layers))),
        "asymmetric": (DeepSupervisionTransformer, replace(common, layer_weights=asym_weights, layer_lr_scales=asym_scales)),
        "layerskip": (DeepSupervisionTransformer, replace(
            common, layer_weights=depth_loss_weights(layers, "sum"), layer_dropout=0.2,
            layer_dropout_shape="exponential", exit_curriculum="rotational", curriculum_period=4,
        )),
        "l3t": (DeepSupervisionTransformer, replace(
            common, layer_weights=l3t_weights, layer_lr_scales=l3t_scales, layer_dropout=0.1,
            layer_dropout_shape="linear",
        )),
    }
    return [Recipe(name, *recipes[name]) for name in RECIPES if name in settings.recipes]
