"""The two EASE decoders: ``StandardTransformer`` and ``DeepSupervisionTransformer``.

Both are Llama-style decoders (RMSNorm, attention with RoPE, SwiGLU, pre-norm blocks).
Layers are numbered from 1 (the first block) to ``num_layers``. The exit head of layer
``l`` is the final RMSNorm plus the output projection applied to that layer's hidden
state; all layers share it. ``forward`` computes logits only for the layers asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

import ease_kernels
from ease._io import atomic_path, atomic_write_text
from ease.exit_classifier import ExitClassifier
from ease.modules import ExitHead, TransformerBlock
from ease.validation import (
    ArgumentTypeError,
    check_bool,
    check_int,
    check_layers,
    check_min_exit_layer,
    check_real,
    check_threshold,
)

if TYPE_CHECKING:
    from ease.calibration import CalibrationResult
    from ease.generation import GenerationOutput

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


@dataclass
class ModelConfig:
    """Shape of a decoder. Fields left ``None`` are derived in ``__post_init__``.

    Attributes:
        vocab_size: number of tokens.
        dim: model width.
        num_layers: number of transformer blocks.
        num_heads: query heads (default: ``dim // 64`` for ``dim >= 256``, else 4).
        num_kv_heads: key/value heads for grouped-query attention (default: ``num_heads``).
        ffn_dim: SwiGLU hidden width (default: ``8/3 * dim`` rounded up to a multiple of 32).
        max_seq_len: the longest sequence the RoPE tables cover.
        rope_theta: RoPE base.
        rope_scaling: optional Hugging Face style RoPE scaling dict (``rope_type: llama3``).
        norm_eps: RMSNorm epsilon.
        dropout: dropout on embeddings, attention and residual branches in training.
        tie_embeddings: share the token embedding with the output projection.
        exit_classifier_dim: the width of the learned exit classifier
            (:class:`ease.exit_classifier.ExitClassifier`), or None for none; set by
            :func:`ease.train_exit_classifier`.
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int | None = None
    num_kv_heads: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    norm_eps: float = 1e-6
    dropout: float = 0.0
    tie_embeddings: bool = True
    exit_classifier_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "max_seq_len"):
            setattr(self, name, check_int(name, getattr(self, name), 1, expected="a positive integer"))
        if self.num_heads is None:
            self.num_heads = self.dim // 64 if self.dim >= 256 else 4
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.ffn_dim is None:
            self.ffn_dim = 32 * math.ceil(8 * self.dim / 3 / 32)
        self.num_heads = check_int("num_heads", self.num_heads, 1, expected=f"an integer >= 1 that divides dim={self.dim}")
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads must be >= 1 and divide dim={self.dim}, got {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"head_dim = dim // num_heads must be even for RoPE, got {self.dim} // {self.num_heads}"
            )
        self.num_kv_heads = check_int(
            "num_kv_heads", self.num_kv_heads, 1, expected=f"an integer >= 1 that divides num_heads={self.num_heads}"
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads must be >= 1 and divide num_heads={self.num_heads}, got {self.num_kv_heads}"
            )
        self.ffn_dim = check_int("ffn_dim", self.ffn_dim, 1, expected="an integer >= 1")
        self.dropout = check_real("dropout", self.dropout, 0.0, 1.0, below=True, expected="in [0, 1)")
        self.norm_eps = check_real("norm_eps", self.norm_eps, 0.0, expected="a finite number >= 0")
        self.rope_theta = check_real("rope_theta", self.rope_theta, 0.0, above=True, expected="a finite number > 0")
        self.tie_embeddings = check_bool("tie_embeddings", self.tie_embeddings)
        if self.exit_classifier_dim is not None:
            self.exit_classifier_dim = check_int("exit_classifier_dim", self.exit_classifier_dim, 1)
        _check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


_ROPE_TYPES = ("default", "llama3")


def _check_rope_scaling(scaling: object) -> None:
    """``rope_scaling`` as :func:`ease_kernels.rope_inv_freq` reads it: None, or a dict.

    ``rope_type`` (or the older ``type``) is ``"default"`` or ``"llama3"``; llama3 needs
    ``factor`` > 0, and its optional ``low_freq_factor`` > 0, ``high_freq_factor`` >
    ``low_freq_factor`` (the band between them is interpolated: equal values divide by
    zero) and ``original_max_position_embeddings`` >= 1 default to 1, 4 and 8192.
    """
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be None or a dict with a 'rope_type' in {_ROPE_TYPES}, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling['rope_type'] must be one of {_ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "default":
        return
    if "factor" not in scaling:
        raise ValueError(f"rope_scaling with rope_type 'llama3' needs the key 'factor', got {scaling!r}")
    check_real("rope_scaling['factor']", scaling["factor"], 0.0, above=True, expected="a finite number > 0")
    low = check_real(
        "rope_scaling['low_freq_factor']", scaling.get("low_freq_factor", 1.0), 0.0, above=True,
        expected="a finite number > 0",
    )  # fmt: skip
    check_real(
        "rope_scaling['high_freq_factor']", scaling.get("high_freq_factor", 4.0), low, above=True,
        expected=f"a finite number > low_freq_factor={low:g}",
    )  # fmt: skip
    check_int(
        "rope_scaling['original_max_position_embeddings']",
        scaling.get("original_max_position_embeddings", 8192), 1, expected="a positive integer",
    )  # fmt: skip


class _Unset:
    """The default of ``generate``'s arguments that :class:`ExitSettings` may supply."""

    _instance: ClassVar[_Unset | None] = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Not given: ``generate`` takes the value from the model's :class:`ExitSettings`."""

_CALIBRATION_KEYS = (
    "threshold", "max_accuracy_drop", "num_tokens", "full_depth_accuracy", "risk", "confidence", "guarantee",
)  # fmt: skip


@dataclass(frozen=True)
class ExitSettings:
    """The early-exit settings a model carries: the defaults of its ``generate``.

    Saved by ``save_pretrained`` (the ``"early_exit"`` object of ``config.json``) and
    ``to_hf_llama`` (its ``config.json`` key ``"ease_early_exit"``), restored by
    ``from_pretrained`` and ``from_hf_llama`` as ``model.exit_settings``. ``generate``
    uses them for the arguments it is not given (see :func:`ease.generation.generate`).
    ``ExitSettings()`` (every field unset) changes nothing: full depth.

    Attributes:
        routing_threshold: the default routing threshold, in (0, 1], or None.
        min_exit_layer: the default earliest exit layer (>= 1; at most ``num_layers``).
        exit_criterion: the confidence the threshold is compared with; ``"max_prob"``
            (the exit head's top-1 softmax probability) is the one ease computes today.
            Stored as a string so that files with criteria added later keep loading.
        draft_layers: the default draft depth of self-speculative decoding
            (``1 <= E < num_layers``), or None.
        calibration: what :func:`ease.calibrate_threshold` found, summarised:
            ``{"threshold", "max_accuracy_drop", "num_tokens", "full_depth_accuracy"}``,
            or None.

    Raises:
        ValueError: a field out of range (an :class:`~ease.validation.ArgumentTypeError`
            for one of the wrong type), named as the argument it is the default of.
    """

    routing_threshold: float | None = None
    min_exit_layer: int = 1
    exit_criterion: str = "max_prob"
    draft_layers: int | None = None
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: store the checked (plain Python) values
        set_(self, "routing_threshold", check_threshold("routing_threshold", self.routing_threshold))
        set_(self, "min_exit_layer", check_min_exit_layer(self.min_exit_layer))
        if not isinstance(self.exit_criterion, str) or not self.exit_criterion:
            raise ArgumentTypeError(f"exit_criterion must be a non-empty string, got {self.exit_criterion!r}")
        if self.draft_layers is not None:
            set_(self, "draft_layers", check_int("draft_layers", self.draft_layers, 1,
                                                 expected="an integer >= 1 or None"))
        if self.calibration is not None:
            set_(self, "calibration", _check_calibration(self.calibration))

    def check_for(self, num_layers: int) -> ExitSettings:
        """``self`` after checking the layer numbers against a model of ``num_layers`` layers.

        Raises:
            ValueError: ``min_exit_layer > num_layers`` or ``draft_layers >= num_layers``.
        """
        check_min_exit_layer(self.min_exit_layer, num_layers)
        if self.draft_layers is not None:
            check_int("draft_layers", self.draft_layers, 1, num_layers - 1)
        return self

    @classmethod
    def from_calibration(
        cls, calibration: CalibrationResult, draft_layers: int | None = None, exit_criterion: str = "max_prob"
    ) -> ExitSettings:
        """Settings whose threshold is the calibrated one (None when none qualified)."""
        return cls(
            routing_threshold=calibration.threshold,
            min_exit_layer=calibration.min_exit_layer,
            exit_criterion=exit_criterion,
            draft_layers=draft_layers,
            calibration={
                "threshold": calibration.threshold,
                "max_accuracy_drop": calibration.max_accuracy_drop,
                "num_tokens": calibration.num_tokens,
                "full_depth_accuracy": calibration.full_depth_accuracy,
                # What was guaranteed, and with what confidence (None: measured only).
                "risk": calibration.risk,
                "confidence": calibration.confidence,
                "guarantee": calibration.guarantee,
            },
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value: object, source: str = "early_exit") -> ExitSettings:
        """Settings from :meth:`to_dict`'s output; errors name ``source`` and the key.

        Raises:
            ValueError: not a dict, an unknown key, or a value the constructor refuses.
        """
        if not isinstance(value, Mapping):
            raise ValueError(f"{source} must be a JSON object of exit settings, got {value!r}")
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; exit settings have {known}")
        try:
            return cls(**value)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error


def _check_calibration(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"calibration must be a dict with keys {list(_CALIBRATION_KEYS)} or None, got {value!r}")
    unknown = sorted(set(value) - set(_CALIBRATION_KEYS))
    if unknown:
        raise ValueError(f"calibration: unknown key(s) {unknown}; expected {list(_CALIBRATION_KEYS)}")
    checked: dict[str, Any] = {}
    if "threshold" in value:
        checked["threshold"] = check_threshold("calibration['threshold']", value["threshold"])
    if "max_accuracy_drop" in value:
        checked["max_accuracy_drop"] = check_real("calibration['max_accuracy_drop']", value["max_accuracy_drop"], 0.0, 1.0)
    if "num_tokens" in value:
        checked["num_tokens"] = check_int("calibration['num_tokens']", value["num_tokens"], 0)
    if "full_depth_accuracy" in value:
        checked["full_depth_accuracy"] = check_real(
            "calibration['full_depth_accuracy']", value["full_depth_accuracy"], 0.0, 1.0
        )
    if "risk" in value:
        if value["risk"] not in ("accuracy", "agreement"):
            raise ValueError(f"calibration['risk'] must be 'accuracy' or 'agreement', got {value['risk']!r}")
        checked["risk"] = value["risk"]
    if value.get("confidence") is not None:
        checked["confidence"] = check_real("calibration['confidence']", value["confidence"], 0.0, 1.0, above=True, below=True)
    elif "confidence" in value:
        checked["confidence"] = None
    if "guarantee" in value:
        if value["guarantee"] is not None and not isinstance(value["guarantee"], str):
            raise ArgumentTypeError(f"calibration['guarantee'] must be a string or None, got {value['guarantee']!r}")
        checked["guarantee"] = value["guarantee"]
    return checked


# Before the exit head was a module of its own, its parameters were the model's "norm.*"
# and "lm_head.*"; files saved then still load.
_LEGACY_HEAD_KEYS = {"norm.weight": "exit_head.norm.weight", "lm_head.weight": "exit_head.proj.weight"}


def _rename_legacy_head_keys(state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: the exit head's old parameter names -> the current ones."""
    for old, new in _LEGACY_HEAD_KEYS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class EarlyExitDecoder(nn.Module):
    """A decoder whose every layer can answer through the shared exit head.

    Subclasses set :attr:`trains_every_layer` and the default layers ``forward`` returns.
    Use :class:`StandardTransformer` or :class:`DeepSupervisionTransformer`.

    Attributes:
        trains_every_layer: True when the layers below the last are trained to answer
            (deep supervision), so that their exits mean something: the trainer then
            supervises them (fused loss), reports per-layer figures and early-exit
            statistics, and ``generate`` may exit early. False (the default, and
            :class:`StandardTransformer`): trained on the final layer only, run at full
            depth; a ``routing_threshold`` is refused.
        exit_head: the shared :class:`~ease.modules.ExitHead` (final norm and projection).
    """

    trains_every_layer: ClassVar[bool] = False

    def __init__(self, vocab_size: int, dim: int, num_layers: int, **kwargs: Any) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, dim=dim, num_layers=num_layers, **kwargs)
        config = self.config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(
                config.dim, config.num_heads, config.num_kv_heads, config.ffn_dim, config.norm_eps, config.dropout
            )
            for _ in range(config.num_layers)
        )
        self.exit_head = ExitHead(config.dim, config.vocab_size, config.norm_eps)
        if config.tie_embeddings:
            self.exit_head.proj.weight = self.embed.weight
        cos, sin = ease_kernels.rope_cos_sin(
            torch.arange(config.max_seq_len), config.head_dim, config.rope_theta, config.rope_scaling
        )
        # Not saved: derived from the config, rebuilt on load.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        # After reset_parameters: the classifier keeps its own initialisation, and a model
        # without one draws exactly the random numbers it always did.
        self.exit_classifier: ExitClassifier | None = None
        if config.exit_classifier_dim is not None:
            self.attach_exit_classifier(config.exit_classifier_dim)
        self._register_load_state_dict_pre_hook(_rename_legacy_head_keys)
        self.exit_settings = ExitSettings()

    @property
    def exit_settings(self) -> ExitSettings:
        """The :class:`ExitSettings` ``generate`` takes its unset arguments from (saved with the model).

        Assigning checks the layer numbers against the model; ``ExitSettings()`` clears them.
        """
        return self._exit_settings

    @exit_settings.setter
    def exit_settings(self, settings: ExitSettings) -> None:
        if not isinstance(settings, ExitSettings):
            raise ArgumentTypeError(f"exit_settings must be an ExitSettings, got {type(settings).__name__}")
        # object.__setattr__: a plain attribute, never a submodule or buffer.
        object.__setattr__(self, "_exit_settings", settings.check_for(self.num_layers))

    # -- construction ---------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 style initialisation: N(0, 0.02), residual projections scaled by depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("out_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=residual_std)
            else:
                nn.init.normal_(param, std=0.02)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def attach_exit_classifier(self, hidden: int = 64) -> ExitClassifier:
        """Give the model a fresh :class:`~ease.exit_classifier.ExitClassifier` of width ``hidden``.

        It is saved and loaded with the model (``config.exit_classifier_dim``); train it
        with :func:`ease.train_exit_classifier`.
        """
        self.config.exit_classifier_dim = check_int("hidden", hidden, 1)
        self.exit_classifier = ExitClassifier(self.config.dim, self.num_layers, hidden, self.config.norm_eps).to(
            self.device
        )
        return self.exit_classifier

    @property
    def norm(self) -> nn.Module:
        """The exit head's final RMSNorm (``exit_head.norm``)."""
        return self.exit_head.norm

    @property
    def lm_head(self) -> nn.Linear:
        """The exit head's output projection (``exit_head.proj``)."""
        return self.exit_head.proj

    def default_exit_layers(self) -> tuple[int, ...]:
        """The layers whose logits ``forward`` returns when none are asked for."""
        return tuple(range(1, self.num_layers + 1))

    # -- forward --------------------------------------------------------------------------
    def check_layers(self, layers: Iterable[int], name: str = "exit_layers") -> list[int]:
        """Sorted unique layer numbers, each an integer in ``1..num_layers``."""
        return check_layers(name, layers, self.num_layers)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Raise a clear error for input ids of the wrong type, rank, length or range."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64 or int32 tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(
                f"input_ids must be [batch, seq] with batch >= 1 and seq >= 1, got shape {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions, more than max_seq_len={self.config.max_seq_len}"
            )
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync, not two
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got range [{low}, {high}]")

    def hidden_states(
        self, input_ids: torch.Tensor, layers: Iterable[int], keep: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Hidden states ``(B, T, dim)`` after each requested layer (before the exit norm).

        Blocks deeper than the deepest requested layer are not run.

        Args:
            input_ids: ``(B, T)`` token ids.
            layers: the layers (1-based) whose states to return.
            keep: layer dropout in training: ``(B, num_layers)`` bool, False where row
                ``b`` skips block ``l`` (its input passes through unchanged); None runs
                every block (:mod:`ease.training.layer_dropout` draws it).
        """
        layers = self.check_layers(layers)
        if not torch.compiler.is_compiling():  # the range check reads values: a graph break
            self.check_input_ids(input_ids)
            if keep is not None and tuple(keep.shape) != (input_ids.shape[0], self.num_layers):
                raise ValueError(
                    f"keep must be [batch, num_layers] = {(input_ids.shape[0], self.num_layers)}, "
                    f"got {tuple(keep.shape)}"
                )
        seq = input_ids.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embed_dropout(self.embed(input_ids))  # (B, T, dim)
        wanted = set(layers)
        states = {}
        for number, block in enumerate(self.layers[: layers[-1]], start=1):
            out = block(x, cos, sin)
            # A skipped row keeps its input: a select, not a gather, so shapes stay static
            # (torch.compile traces one graph whatever the decisions).
            x = out if keep is None else torch.where(keep[:, number - 1, None, None], out, x)
            if number in wanted:
                states[number] = x
        return states

    def forward(self, input_ids: torch.Tensor, exit_layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """Logits of the requested layers.

        Args:
            input_ids: ``(B, T)`` token ids in ``[0, vocab_size)``, ``T <= max_seq_len``.
            exit_layers: layer numbers (1-based) whose logits to compute; default
                :meth:`default_exit_layers`. Layers not named compute no logits.

        Returns:
            ``{layer: logits (B, T, vocab_size)}`` for each requested layer.
        """
        layers = self.default_exit_layers() if exit_layers is None else exit_layers
        return {layer: self.exit_head(h) for layer, h in self.hidden_states(input_ids, layers).items()}

    # -- generation -----------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor] | Sequence[int],
        max_new_tokens: int,
        routing_threshold: Any = UNSET,
        temperature: float = 0.0,
        top_k: int | None = None,
        **kwargs: Any,
    ) -> "GenerationOutput":
        """Generate tokens with a KV cache; full depth, early exit or self-speculative.

        ``routing_threshold`` (in (0, 1]) exits each token at the first layer
        ``>= min_exit_layer`` whose exit-head confidence reaches it and skips the deeper
        blocks; ``draft_layers=E`` decodes self-speculatively (lossless). Left unset,
        ``routing_threshold``, ``min_exit_layer`` and ``draft_layers`` come from
        :attr:`exit_settings`; ``routing_threshold=None`` runs at full depth. Keyword options
        (``min_exit_layer``, ``draft_layers``, ``num_draft_tokens``, ``draft_threshold``, ``exit_criterion``,
        ``attention_mask``, ``seed``, ``generator``, ``pad_token_id``) and errors: see
        :func:`ease.generation.generate`.

        Returns:
            :class:`ease.generation.GenerationOutput`: ``tokens``, ``new_tokens``,
            ``token_exit_layers`` (the layer each new token exited at; alias
            ``exit_layers``) and ``mean_exit_layer``.
        """
        from ease.generation import generate

        return generate(self, input_ids, max_new_tokens, routing_threshold, temperature, top_k, **kwargs)

    # -- persistence ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
        """Write ``model.safetensors`` (and ``tokenizer.json``), then ``config.json``, into ``directory``.

        ``config.json`` holds the model class, its :class:`ModelConfig`, the weights'
        checksum and, under ``"early_exit"``, :attr:`exit_settings`. With ``tokenizer`` (a
        ``tokenizers.Tokenizer``, such as ``load_data(...).tokenizer``, or a Hugging Face
        fast tokenizer) it is saved as ``tokenizer.json`` beside the weights, where
        ``ease-generate`` and the lm-eval model look for it.

        Each file is written to a temporary name in the directory, flushed to disk and
        renamed, so an interrupted save never leaves a half-written file under the real
        name. ``config.json`` is written last and records the SHA-256 of the weights it
        goes with (``weights_sha256``): a save killed between the two renames leaves new
        weights beside the old config, which :meth:`from_pretrained` refuses rather than
        load as a mix (save again to repair it); a completed save loads as the new model.
        """
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_model(self, str(tmp))
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())  # on disk before the rename publishes it
            digest = _sha256(tmp)
        if tokenizer is not None:
            atomic_write_text(directory / TOKENIZER_NAME, _tokenizer_json(tokenizer))
        payload = {
            "model_class": type(self).__name__,
            "config": dataclasses.asdict(self.config),
            "weights_sha256": digest,
            "early_exit": self.exit_settings.to_dict(),
        }
        atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=2))
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> "EarlyExitDecoder":
        """Load a model written by :meth:`save_pretrained`.

        Called on :class:`EarlyExitDecoder` (or ``ease.load_model``), the class recorded in
        ``config.json`` is built; called on a subclass, that subclass is built.

        The weights are checked against the SHA-256 that ``config.json`` records (folders
        saved before it was recorded load unchecked), and every tensor must hold floating
        point numbers.

        Raises:
            FileNotFoundError: no ``config.json`` or ``model.safetensors`` in ``directory``.
            ValueError: ``config.json`` that is not a JSON object of an ease model (the
                message names the file and the key); weights that do not match its
                checksum (corrupt, or a save interrupted between the two files); a tensor
                that is not floating point (named, with its dtype); a file safetensors
                cannot read.
            RuntimeError: the weights do not fit the model the config describes.
        """
        from safetensors.torch import load_model

        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        weights_path = directory / WEIGHTS_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        payload = _read_json_object(config_path)
        model_cls = cls
        if cls is EarlyExitDecoder:
            model_cls = MODEL_CLASSES.get(payload.get("model_class"))
            if model_cls is None:
                raise ValueError(
                    f"{config_path}: model_class must be one of {sorted(MODEL_CLASSES)}, "
                    f"got {payload.get('model_class')!r}"
                )
        config = _config_fields(payload, config_path)
        try:
            model = model_cls(config.pop("vocab_size"), config.pop("dim"), config.pop("num_layers"), **config)
        except ValueError as error:
            raise ValueError(f"{config_path}: {error}") from error
        if not weights_path.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory} (its {CONFIG_NAME} is there)")
        expected = payload.get("weights_sha256")
        if expected is not None:
            if not isinstance(expected, str):
                raise ValueError(f"{config_path}: weights_sha256 must be a hex string, got {expected!r}")
            actual = _sha256(weights_path)
            if actual != expected:
                raise ValueError(
                    f"{weights_path} does not match the checksum in {config_path} (sha256 {actual}, "
                    f"recorded {expected}): the file is corrupt, or a save was interrupted between "
                    "the two files; save the model again"
                )
        _check_floating_tensors(weights_path)  # reads the header: an unreadable file fails here
        if "early_exit" in payload:  # folders saved before exit settings were recorded have none
            model.exit_settings = _exit_settings_from(payload["early_exit"], model.num_layers, f"{config_path}: early_exit")
        load_model(model, str(weights_path), strict=True, device=str(map_location))
        return model.to(map_location)


def _exit_settings_from(value: object, num_layers: int, source: str) -> ExitSettings:
    """:class:`ExitSettings` read from a file, checked against the model; errors name ``source``."""
    settings = ExitSettings.from_dict(value, source)
    try:
        return settings.check_for(num_layers)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def _tokenizer_json(tokenizer: Any) -> str:
    """The ``tokenizer.json`` text of a ``tokenizers.Tokenizer`` or a Hugging Face fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers' fast tokenizers wrap one
    if not callable(getattr(backend, "to_str", None)):
        raise ArgumentTypeError(
            f"tokenizer must be a tokenizers.Tokenizer (or a Hugging Face fast tokenizer), got {type(tokenizer).__name__}"
        )
    return backend.to_str()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _config_fields(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``"config"`` object of a saved model's ``config.json``, its keys checked."""
    config = payload.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must be a dict of ModelConfig fields, got {config!r}")
    known = [field.name for field in dataclasses.fields(ModelConfig)]
    for key in ("vocab_size", "dim", "num_layers"):
        if key not in config:
            raise ValueError(f"{path}: config.{key} is missing")
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown} in 'config'; ModelConfig has {known}")
    return dict(config)


def _check_floating_tensors(path: Path) -> None:
    """Refuse integer or bool tensors: loading would cast them silently into float weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    except Exception as error:  # safetensors' own error type
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    for name, dtype in dtypes.items():
        if not dtype.startswith(("F", "BF")):  # F16, BF16, F32, F64, F8_*
            torch_name = _SAFETENSORS_DTYPES.get(dtype, dtype)
            raise ValueError(f"{path}: tensor {name!r} has dtype {torch_name}; model weights must be floating point")


# safetensors' dtype codes, as torch names them, for messages.
_SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
}  # fmt: skip


class StandardTransformer(EarlyExitDecoder):
    """A decoder trained on its final layer only and run at full depth.

    ``forward`` returns the last layer's logits unless other layers are asked for.
    """

    trains_every_layer = False

    def default_exit_layers(self) -> tuple[int, ...]:
        return (self.num_layers,)


class DeepSupervisionTransformer(EarlyExitDecoder):
    """A decoder whose every layer is supervised through the shared exit head.

    ``forward`` returns the logits of every layer unless fewer are asked for, and the
    model can exit early per token at inference.
    """

    trains_every_layer = True


MODEL_CLASSES: dict[str, type[EarlyExitDecoder]] = {
    "StandardTransformer": StandardTransformer,
    "DeepSupervisionTransformer": DeepSupervisionTransformer,
}


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> EarlyExitDecoder:
    """Load a model saved with ``save_pretrained``, whichever class it is."""
    return EarlyExitDecoder.from_pretrained(directory, map_location)
