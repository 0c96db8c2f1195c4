"""Hugging Face Llama checkpoints in and out of EASE.

:func:`from_hf_llama` turns a ``LlamaForCausalLM`` (an in-memory model, or a local
directory holding ``config.json`` and ``*.safetensors``) into a
:class:`~ease.models.DeepSupervisionTransformer` or
:class:`~ease.models.StandardTransformer` with the same weights, so its last layer's
logits are the Hugging Face model's and every other layer gains an exit through the
shared head. :func:`to_hf_llama` writes an EASE decoder back as a directory that
``transformers.LlamaForCausalLM.from_pretrained`` loads.

Neither needs ``transformers``: an in-memory model is read through ``state_dict()`` and
``config.to_dict()``, a directory through ``safetensors``. Nothing is downloaded.

The two layouts differ only in naming and in two fusions (``L`` = layer index from 0 in
Hugging Face, ``l = L + 1`` in EASE's numbering)::

    model.embed_tokens.weight                        -> embed.weight
    model.layers.L.input_layernorm.weight            -> layers.L.attention_norm.weight
    model.layers.L.self_attn.{q,k,v}_proj.weight     -> layers.L.attention.qkv_proj.weight  (rows q, k, v)
    model.layers.L.self_attn.o_proj.weight           -> layers.L.attention.out_proj.weight
    model.layers.L.post_attention_layernorm.weight   -> layers.L.ffn_norm.weight
    model.layers.L.mlp.{gate,up}_proj.weight         -> layers.L.ffn.gate_up_proj.weight    (rows gate, up)
    model.layers.L.mlp.down_proj.weight              -> layers.L.ffn.down_proj.weight
    model.norm.weight                                -> norm.weight
    lm_head.weight                                   -> lm_head.weight (absent when tied)

Both use rotate-half RoPE over the full head dimension, attention scaled by
``1 / sqrt(head_dim)``, and RMSNorm computed in float32, so in float32 the logits agree
to rounding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

import ease_kernels
from ease._io import atomic_path, atomic_write_text
from ease.models import DeepSupervisionTransformer, EarlyExitDecoder, StandardTransformer, _exit_settings_from
from ease.validation import check_bool, check_int

HF_ARCHITECTURE = "LlamaForCausalLM"
EXIT_SETTINGS_KEY = "ease_early_exit"
"""The ``config.json`` key of an exported model's :class:`~ease.models.ExitSettings` (namespaced:
Hugging Face ignores it, :func:`from_hf_llama` restores it as ``model.exit_settings``)."""
GENERATION_CONFIG_NAME = "generation_config.json"
HF_MODEL_TYPE = "llama"
SAFETENSORS_INDEX = "model.safetensors.index.json"

MODEL_CLASS_NAMES: dict[str, type[EarlyExitDecoder]] = {
    "deep_supervision": DeepSupervisionTransformer,
    "standard": StandardTransformer,
    "DeepSupervisionTransformer": DeepSupervisionTransformer,
    "StandardTransformer": StandardTransformer,
}

# Tensors some Llama checkpoints carry that hold no weights (old transformers saved the
# RoPE table); they are derived from the config and skipped.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# Activations computing silu(x) = x * sigmoid(x) in transformers' ACT2FN.
_SILU_NAMES = ("silu", "swish")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# ---------------------------------------------------------------------------------------
# Config: Hugging Face LlamaConfig dict <-> ease ModelConfig keyword arguments
# ---------------------------------------------------------------------------------------
def _require(config: Mapping[str, Any], key: str, source: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"{source}: the Llama config has no {key!r}")
    return config[key]


def _count(config: Mapping[str, Any], key: str, source: str, default: int | None = None) -> int:
    """A size field (``hidden_size``, ``num_attention_heads``, ...): an integer >= 1.

    Absent (or ``null``) it is ``default``, or an error when there is none. Zero, a
    negative number, a float or a string is refused: ``0`` heads used to divide by zero,
    and ``num_key_value_heads: 0`` or ``max_position_embeddings: 0`` were replaced by a
    default without a word.
    """
    value = config.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"{source}: the Llama config has no {key!r}")
        return default
    return check_int(f"{source}: {key}", value, 1)


def _rope_settings(config: Mapping[str, Any], source: str) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from either config form.

    transformers 5.x keeps both in ``rope_parameters`` (``{"rope_type", "rope_theta",
    ...}``); 4.x wrote ``rope_theta`` at the top level and the scaling in
    ``rope_scaling``. As transformers 5.x does, a non-empty ``rope_scaling`` wins, and
    ``original_max_position_embeddings`` defaults to ``max_position_embeddings``.
    """
    parameters = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{source}: rope_parameters must be a dict, got {parameters!r}")
    if parameters and all(isinstance(value, Mapping) for value in parameters.values()):
        raise ValueError(
            f"{source}: per-layer-type RoPE parameters {sorted(parameters)} are not supported; "
            "Llama uses one RoPE for every layer"
        )
    theta = float(parameters.get("rope_theta") or config.get("rope_theta") or 10000.0)
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    partial = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor")) or 1.0
    if float(partial) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported (RoPE over the full head)")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"{source}: unsupported RoPE type {rope_type!r}; from_hf_llama supports 'default' and 'llama3'"
        )
    scaling = {"rope_type": "llama3"}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if parameters.get(key) is None:
            raise ValueError(f"{source}: llama3 RoPE scaling needs {key!r}, got {dict(parameters)}")
        scaling[key] = float(parameters[key])
    original = parameters.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    if original is None:
        raise ValueError(f"{source}: llama3 RoPE scaling needs 'original_max_position_embeddings'")
    scaling["original_max_position_embeddings"] = int(original)
    return theta, scaling


def _check_architecture(config: Mapping[str, Any], source: str) -> None:
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if architectures and HF_ARCHITECTURE not in architectures:
        raise ValueError(
            f"{source}: unsupported architecture {', '.join(map(str, architectures))} "
            f"(model_type={model_type!r}); from_hf_llama reads {HF_ARCHITECTURE} only"
        )
    if model_type is not None and model_type != HF_MODEL_TYPE:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; from_hf_llama reads "
            f"{HF_ARCHITECTURE} (model_type 'llama') only"
        )


def model_kwargs_from_hf_config(
    config: Mapping[str, Any], max_seq_len: int | None = None, source: str = "config"
) -> dict[str, Any]:
    """Keyword arguments of an EASE decoder equivalent to a Hugging Face Llama config.

    Args:
        config: a ``LlamaConfig`` as a dict (``config.json``, or ``config.to_dict()``).
        max_seq_len: length of the RoPE tables; default ``max_position_embeddings``.
        source: where the config came from, for error messages.

    Returns:
        ``{"vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim",
        "max_seq_len", "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings",
        "dropout"}``.

    Raises:
        ValueError: a model that is not ``LlamaForCausalLM``, a missing field, a size
            that is not an integer >= 1 (``num_attention_heads: 0``), a
            ``tie_word_embeddings`` that is not a JSON boolean, or a feature EASE's
            blocks do not have (biases, a ``head_dim`` other than ``hidden_size //
            num_attention_heads``, an activation other than SiLU, RoPE other than default
            or llama3), each named.
    """
    _check_architecture(config, source)
    dim = _count(config, "hidden_size", source)
    num_heads = _count(config, "num_attention_heads", source)
    num_kv_heads = _count(config, "num_key_value_heads", source, default=num_heads)
    head_dim = config.get("head_dim")
    if head_dim is not None and (dim % num_heads or int(head_dim) != dim // num_heads):
        raise ValueError(
            f"{source}: head_dim={head_dim} differs from hidden_size // num_attention_heads = "
            f"{dim} // {num_heads}; EASE's attention needs head_dim * num_heads == hidden_size"
        )
    activation = config.get("hidden_act", "silu")
    if activation not in _SILU_NAMES:
        raise ValueError(f"{source}: unsupported hidden_act {activation!r}; EASE's SwiGLU uses 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{source}: {flag}=True is not supported; EASE's projections have no bias")
    theta, scaling = _rope_settings(config, source)
    if max_seq_len is None:
        max_seq_len = _count(config, "max_position_embeddings", source, default=2048)  # LlamaConfig's default
    tied = config.get("tie_word_embeddings")
    return {
        "vocab_size": _count(config, "vocab_size", source),
        "dim": dim,
        "num_layers": _count(config, "num_hidden_layers", source),
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "ffn_dim": _count(config, "intermediate_size", source),
        "max_seq_len": check_int("max_seq_len", max_seq_len, 1),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        # LlamaConfig's default is False; a string such as "false" is refused, not read as True.
        "tie_embeddings": False if tied is None else check_bool(f"{source}: tie_word_embeddings", tied),
        "dropout": 0.0,
    }


def hf_config_from_model(model: EarlyExitDecoder, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` equivalent to an EASE decoder.

    Written in both forms, so transformers 4.x (``rope_theta``, ``rope_scaling``) and 5.x
    (``rope_parameters``) read the same RoPE.
    """
    config = model.config
    scaling = dict(config.rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        # The defaults of ease_kernels.rope_inv_freq, written out: transformers needs them all.
        scaling = {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 8192)),
        }
    elif rope_type == "default":
        scaling = None
    else:
        raise ValueError(f"model.config.rope_scaling: RoPE type {rope_type!r} has no Llama equivalent")
    dtype = dtype or model.embed.weight.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if scaling is not None:
        scaling = {**scaling, "rope_theta": config.rope_theta}
        rope_parameters = dict(scaling)
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": dtype_name,
    }


# ---------------------------------------------------------------------------------------
# Reading tensors: an in-memory model or a directory of safetensors files
# ---------------------------------------------------------------------------------------
class _TensorSource:
    """Named tensors read on demand, with the place each came from for error messages."""

    def __init__(
        self,
        names: Iterable[str],
        read: Callable[[str], torch.Tensor],
        where: Callable[[str], str],
        borrowed: bool = False,
        close: Callable[[], None] | None = None,
    ):
        self.names = set(names)
        self._read = read
        self.where = where
        self.close = close or (lambda: None)
        # The tensors belong to a live model: the converted one must get copies, or
        # training it would change the source model too.
        self.borrowed = borrowed

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.names:
            raise ValueError(f"{self.where(name)}: missing tensor {name!r} (expected shape {shape})")
        tensor = self._read(name)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.where(name)}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        if not tensor.is_floating_point():  # an integer or bool tensor would be cast silently
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise ValueError(f"{self.where(name)}: tensor {name!r} has dtype {dtype}; weights must be floating point")
        return tensor


def _is_hf_model(obj: object) -> bool:
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "config") and hasattr(obj.config, "to_dict")


def _source_from_model(model: torch.nn.Module) -> tuple[dict[str, Any], _TensorSource, str]:
    names = [cls.__name__ for cls in type(model).__mro__]
    label = f"{type(model).__name__} model"
    if HF_ARCHITECTURE not in names:
        raise ValueError(
            f"{label}: unsupported architecture {type(model).__name__}; from_hf_llama reads {HF_ARCHITECTURE}"
        )
    config = model.config.to_dict()
    config.setdefault("architectures", [HF_ARCHITECTURE])
    state = model.state_dict()
    return config, _TensorSource(state, state.__getitem__, lambda name: label, borrowed=True), label


def _check_shard_name(file: object, index_path: Path) -> None:
    """A shard named by the index must be a relative path inside the model folder.

    Checked on the name, not on the resolved path: symbolic links inside the folder
    (the Hugging Face cache links every file to a blob elsewhere) are the folder's own.
    """
    if not isinstance(file, str) or not file:
        raise ValueError(f"{index_path} names shard {file!r}; shard names must be non-empty strings")
    pieces = file.replace("\\", "/").split("/")  # either separator, whichever system wrote the index
    if Path(file).is_absolute() or file.startswith(("/", "\\")) or ".." in pieces or ":" in pieces[0]:
        raise ValueError(
            f"{index_path} names shard {file!r}, outside the model folder; shards must be relative "
            "paths inside it"
        )


def _source_from_directory(directory: Path) -> tuple[dict[str, Any], _TensorSource, str]:
    from safetensors import safe_open

    label = str(directory)
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    index_path = directory / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: no 'weight_map' dict")
        for file in weight_map.values():
            _check_shard_name(file, index_path)
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (directory / file).is_file():
                raise FileNotFoundError(f"{index_path} names shard {file!r}, which is not in {directory}")
    else:
        files = sorted(path.name for path in directory.glob("*.safetensors"))
        if not files:
            others = sorted(path.name for path in directory.glob("*.bin")) + sorted(
                path.name for path in directory.glob("*.pt*")
            )
            hint = f" (found {', '.join(others)}: only safetensors checkpoints are read)" if others else ""
            raise FileNotFoundError(f"no *.safetensors files in {directory}{hint}")
        weight_map = {}
        for file in files:
            with safe_open(str(directory / file), framework="pt") as handle:
                for name in handle.keys():
                    weight_map.setdefault(name, file)
    handles: dict[str, Any] = {}

    def read(name: str) -> torch.Tensor:
        file = weight_map[name]
        if file not in handles:
            handles[file] = safe_open(str(directory / file), framework="pt").__enter__()
        return handles[file].get_tensor(name)

    def where(name: str) -> str:
        return str(directory / weight_map[name]) if name in weight_map else str(directory)

    def close() -> None:
        while handles:
            handles.popitem()[1].__exit__(None, None, None)

    return config, _TensorSource(weight_map, read, where, close=close), label


# ---------------------------------------------------------------------------------------
# Hugging Face -> EASE
# ---------------------------------------------------------------------------------------
def _resolve_model_class(model_class: str | type[EarlyExitDecoder]) -> type[EarlyExitDecoder]:
    if isinstance(model_class, type) and issubclass(model_class, EarlyExitDecoder):
        return model_class
    if isinstance(model_class, str) and model_class in MODEL_CLASS_NAMES:
        return MODEL_CLASS_NAMES[model_class]
    raise ValueError(
        f"model_class must be one of {sorted(MODEL_CLASS_NAMES)} or a subclass of EarlyExitDecoder, got {model_class!r}"
    )


def _ease_state_dict(
    source: _TensorSource, kwargs: Mapping[str, Any], dtype: torch.dtype | None, device: torch.device | None
) -> dict[str, torch.Tensor]:
    """EASE names -> tensors, fused and converted; every checkpoint tensor accounted for."""
    dim, vocab, ffn_dim = kwargs["dim"], kwargs["vocab_size"], kwargs["ffn_dim"]
    head_dim = dim // kwargs["num_heads"]
    q_size, kv_size = kwargs["num_heads"] * head_dim, kwargs["num_kv_heads"] * head_dim
    used: set[str] = set()
    embed = source.get("model.embed_tokens.weight", (vocab, dim))
    dtype = dtype or embed.dtype  # default: the checkpoint's

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        used.add(name)
        tensor = embed if name == "model.embed_tokens.weight" else source.get(name, shape)
        return tensor.detach().to(device=device, dtype=dtype, copy=source.borrowed)

    state = {"embed.weight": take("model.embed_tokens.weight", (vocab, dim))}
    for index in range(kwargs["num_layers"]):
        hf, ez = f"model.layers.{index}", f"layers.{index}"
        state[f"{ez}.attention_norm.weight"] = take(f"{hf}.input_layernorm.weight", (dim,))
        state[f"{ez}.attention.qkv_proj.weight"] = torch.cat(
            [
                take(f"{hf}.self_attn.q_proj.weight", (q_size, dim)),
                take(f"{hf}.self_attn.k_proj.weight", (kv_size, dim)),
                take(f"{hf}.self_attn.v_proj.weight", (kv_size, dim)),
            ]
        )
        state[f"{ez}.attention.out_proj.weight"] = take(f"{hf}.self_attn.o_proj.weight", (dim, q_size))
        state[f"{ez}.ffn_norm.weight"] = take(f"{hf}.post_attention_layernorm.weight", (dim,))
        state[f"{ez}.ffn.gate_up_proj.weight"] = torch.cat(
            [take(f"{hf}.mlp.gate_proj.weight", (ffn_dim, dim)), take(f"{hf}.mlp.up_proj.weight", (ffn_dim, dim))]
        )
        state[f"{ez}.ffn.down_proj.weight"] = take(f"{hf}.mlp.down_proj.weight", (dim, ffn_dim))
    state["norm.weight"] = take("model.norm.weight", (dim,))
    if kwargs["tie_embeddings"]:
        # A tied checkpoint may still list lm_head.weight (an in-memory model's state_dict does).
        used.add("lm_head.weight")
        state["lm_head.weight"] = state["embed.weight"]
    else:
        state["lm_head.weight"] = take("lm_head.weight", (vocab, dim))
    unexpected = sorted(name for name in source.names - used if not name.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(repr(name) for name in unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
        raise ValueError(
            f"{source.where(unexpected[0])}: {len(unexpected)} unexpected tensor(s) for a "
            f"{kwargs['num_layers']}-layer {HF_ARCHITECTURE} without biases: {shown}"
        )
    return state


def from_hf_llama(
    model_or_dir: torch.nn.Module | str | os.PathLike,
    model_class: str | type[EarlyExitDecoder] = "deep_supervision",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    max_seq_len: int | None = None,
) -> EarlyExitDecoder:
    """Build an EASE decoder holding the weights of a Hugging Face ``LlamaForCausalLM``.

    Grouped-query attention, ``rope_theta``, Llama 3 RoPE scaling (``rope_type:
    llama3``, read from ``rope_parameters`` or the older ``rope_scaling``), tied or
    untied embeddings and ``rms_norm_eps`` are carried over. The last layer's logits
    equal the Hugging Face model's; the other layers answer through the same final norm
    and head, ready for deep supervision and early exit.

    Args:
        model_or_dir: a ``LlamaForCausalLM`` in memory, or a local directory with
            ``config.json`` and ``*.safetensors`` (one file, several, or shards listed in
            ``model.safetensors.index.json``). Nothing is downloaded.
        model_class: ``"deep_supervision"`` (default), ``"standard"``, either class name,
            or a subclass of :class:`~ease.models.EarlyExitDecoder`.
        dtype: parameter dtype; default the checkpoint's (that of
            ``model.embed_tokens.weight``).
        device: where the parameters go; default where the source tensors are (the CPU
            for a directory).
        max_seq_len: length of the RoPE tables, the longest input the model accepts;
            default the config's ``max_position_embeddings``.

    Returns:
        The decoder, in eval mode (dropout is 0 in any case).

    Raises:
        FileNotFoundError: a directory without ``config.json`` or safetensors files.
        ValueError: an architecture other than ``LlamaForCausalLM``, an unsupported
            feature or a bad config value, a missing or unexpected tensor, a tensor of
            the wrong shape or of an integer or bool dtype, or an index naming a shard
            outside the directory (``../x.safetensors``, an absolute path); the message
            names it (and the file it was read from).
    """
    cls = _resolve_model_class(model_class)
    if _is_hf_model(model_or_dir):
        config, source, label = _source_from_model(model_or_dir)
    elif isinstance(model_or_dir, (str, os.PathLike)):
        config, source, label = _source_from_directory(Path(model_or_dir))
    else:
        raise TypeError(
            f"model_or_dir must be a LlamaForCausalLM or a directory path, got {type(model_or_dir).__name__}"
        )
    try:
        kwargs = model_kwargs_from_hf_config(config, max_seq_len=max_seq_len, source=label)
        state = _ease_state_dict(source, kwargs, dtype, None if device is None else torch.device(device))
    finally:
        source.close()
    device = state["embed.weight"].device

    # Built on the meta device and filled by assignment: no random initialisation and no
    # second copy of the weights, which matters for real checkpoints.
    args = (kwargs.pop("vocab_size"), kwargs.pop("dim"), kwargs.pop("num_layers"))
    with torch.device("meta"):
        model = cls(*args, **kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # assignment gave each its own Parameter
    # The RoPE tables are not in the state dict: computed here as in EarlyExitDecoder.__init__.
    cfg = model.config
    model.rope_cos, model.rope_sin = ease_kernels.rope_cos_sin(
        torch.arange(cfg.max_seq_len, device=device), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    )
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"from_hf_llama left tensors uninitialised: {left}")
    if config.get(EXIT_SETTINGS_KEY) is not None:  # a model exported by to_hf_llama
        model.exit_settings = _exit_settings_from(config[EXIT_SETTINGS_KEY], model.num_layers, f"{label}: {EXIT_SETTINGS_KEY}")
    return model.eval()


# ---------------------------------------------------------------------------------------
# EASE -> Hugging Face
# ---------------------------------------------------------------------------------------
def hf_llama_state_dict(model: EarlyExitDecoder, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights of an EASE decoder under ``LlamaForCausalLM`` names, unfused, on the CPU.

    Every tensor is its own contiguous copy (safetensors refuses shared storage); with
    tied embeddings ``lm_head.weight`` is left out, as Hugging Face saves it.
    """
    config = model.config
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    dtype = dtype or model.embed.weight.dtype

    def out(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device="cpu", dtype=dtype).clone().contiguous()

    state = {"model.embed_tokens.weight": out(model.embed.weight)}
    for index, block in enumerate(model.layers):
        hf = f"model.layers.{index}"
        q, k, v = block.attention.qkv_proj.weight.split([q_size, kv_size, kv_size])
        gate, up = block.ffn.gate_up_proj.weight.chunk(2)
        state[f"{hf}.input_layernorm.weight"] = out(block.attention_norm.weight)
        state[f"{hf}.self_attn.q_proj.weight"] = out(q)
        state[f"{hf}.self_attn.k_proj.weight"] = out(k)
        state[f"{hf}.self_attn.v_proj.weight"] = out(v)
        state[f"{hf}.self_attn.o_proj.weight"] = out(block.attention.out_proj.weight)
        state[f"{hf}.post_attention_layernorm.weight"] = out(block.ffn_norm.weight)
        state[f"{hf}.mlp.gate_proj.weight"] = out(gate)
        state[f"{hf}.mlp.up_proj.weight"] = out(up)
        state[f"{hf}.mlp.down_proj.weight"] = out(block.ffn.down_proj.weight)
    state["model.norm.weight"] = out(model.norm.weight)
    if not config.tie_embeddings:
        state["lm_head.weight"] = out(model.lm_head.weight)
    return state


def to_hf_llama(
    model: EarlyExitDecoder,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write an EASE decoder as a Hugging Face ``LlamaForCausalLM`` checkpoint.

    ``directory`` receives ``config.json`` and ``model.safetensors`` (each written
    atomically), which ``LlamaForCausalLM.from_pretrained(directory)`` loads and
    :func:`from_hf_llama` reads back. The Hugging Face model's logits are the EASE
    model's last-layer logits; the early exits are not part of a Llama checkpoint (they
    need no weights of their own: every exit reuses the final norm and head).

    ``model.exit_settings`` travel under the ``config.json`` key ``"ease_early_exit"``
    (:data:`EXIT_SETTINGS_KEY`), which :func:`from_hf_llama` restores. When they hold a
    draft depth ``E`` (``draft_layers``), ``generation_config.json`` is written too, with
    ``assistant_early_exit: E``: transformers' own LayerSkip-style self-speculative
    decoding, which drafts with the first ``E`` layers, the final norm and ``lm_head``
    (ease's exit head) and verifies with the whole model, so greedy output equals
    full-depth greedy output. transformers runs assisted generation one sequence at a
    time; pass ``assistant_early_exit=None`` to ``generate`` for a batch.

    Args:
        model: a :class:`~ease.models.StandardTransformer` or
            :class:`~ease.models.DeepSupervisionTransformer`.
        directory: created if missing.
        dtype: dtype of the saved tensors; default the model's.
        extra_config: fields merged into ``config.json`` (e.g. ``bos_token_id``,
            ``eos_token_id`` of the tokenizer the model was trained with).

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    if not isinstance(model, EarlyExitDecoder):
        raise TypeError(f"model must be an EASE EarlyExitDecoder, got {type(model).__name__}")
    if dtype is not None and dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config_from_model(model, dtype)
    config.update(extra_config or {})
    state = hf_llama_state_dict(model, dtype)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())  # on disk before the rename publishes it
    settings = model.exit_settings
    config[EXIT_SETTINGS_KEY] = settings.to_dict()
    generation_path = directory / GENERATION_CONFIG_NAME
    try:
        generation = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        generation = None  # not ours to repair; replaced below only if a draft depth is to be written
    if not isinstance(generation, dict):
        generation = None
    if settings.draft_layers is not None:
        generation = generation or {key: config.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
        generation["assistant_early_exit"] = settings.draft_layers
        atomic_write_text(generation_path, json.dumps(generation, indent=2, sort_keys=True) + "\n")
    elif generation is not None and "assistant_early_exit" in generation:
        # An earlier export's draft depth, which this model's settings no longer hold.
        del generation["assistant_early_exit"]
        atomic_write_text(generation_path, json.dumps(generation, indent=2, sort_keys=True) + "\n")
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory

