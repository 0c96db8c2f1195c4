"""Drop-in ease kernels for Hugging Face Llama models: :func:`patch_llama` and :func:`unpatch`.

For people who keep their Hugging Face code: ``patch_llama(model)`` swaps, in place,

- every ``LlamaRMSNorm`` forward for :func:`ease_kernels.rms_norm` (an instance
  attribute, so only this model's norms change), and
- the rotary-embedding application, ``apply_rotary_pos_emb`` of
  ``transformers.models.llama.modeling_llama``, for :func:`ease_kernels.apply_rope`.

The model's weights, modules and outputs stay as they were (logits agree within the
rounding of the model's dtype), and training works: both ops have their backward.
:func:`unpatch` restores the Hugging Face forwards.

``LlamaAttention.forward`` calls ``apply_rotary_pos_emb`` as a global of its modeling
module, so that swap is process-wide: while at least one patched model is alive, every
Llama model in the process rotates through the ease op (the same math, rotate-half RoPE,
computed in float32). The module keeps a record of the patched models: the original
function is put back when the last one is unpatched or garbage collected.

Which kernel runs is decided, as for every op of this package, by
:func:`ease_kernels.dispatch.use_triton` (the Triton kernels on CUDA by default).
``transformers`` is not imported by this module; the modeling module is found from the
model's own classes.
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ease_kernels.rms_norm import rms_norm
from ease_kernels.rope import apply_rope

_NORM_CLASS = "LlamaRMSNorm"
_ATTENTION_CLASS = "LlamaAttention"
_ROPE_FUNCTION = "apply_rotary_pos_emb"


@dataclass
class _RopeSwap:
    """One swapped modeling module: the function it had and the patched models using it."""

    original: Callable
    users: set[int] = field(default_factory=set)


# modeling module name -> its swap, while any patched model uses it.
_ROPE_SWAPS: dict[str, _RopeSwap] = {}


@dataclass
class _PatchRecord:
    modules: list[str]  # modeling modules whose apply_rotary_pos_emb this model holds swapped
    finalizer: weakref.finalize  # releases the swaps if the model is dropped while patched


# id(model) -> its record, for every patched model alive. Kept here rather than on the
# model, so that a copy (copy.deepcopy) is never mistaken for a registered model. An id
# cannot be reused while its entry exists: the finalizer removes it when the model dies.
_PATCHED: dict[int, _PatchRecord] = {}


def _has_class(module: nn.Module, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(module).__mro__)


# ---------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------
def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` through :func:`ease_kernels.rms_norm`.

    Hugging Face returns ``weight * normed.to(input_dtype)``, whose dtype is the promotion
    of the weight's and the input's; the result is cast to that dtype so that a float32
    weight on a half input gives what it gave before.
    """
    out = rms_norm(hidden_states, self.weight, self.variance_epsilon)
    out_dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)


# ---------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------
def _make_apply_rotary_pos_emb(original: Callable) -> Callable:
    """A replacement for ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``.

    Hugging Face passes ``q``/``k`` as ``[B, H, T, D]`` (``unsqueeze_dim=1``) and
    ``cos``/``sin`` as ``[B, T, D]`` whose two halves are equal (``cat(freqs, freqs)``).
    :func:`apply_rope` wants ``[B, T, H, D]`` and ``[(B,) T, D/2]``: the transposes are
    views (the op takes any strides with a unit last stride) and the halves are slices,
    so nothing is copied before the kernel. Calls of any other form go to ``original``.
    """

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        fits = (
            unsqueeze_dim in (1, 2)
            and q.dim() == 4
            and k.dim() == 4
            and cos.dim() in (2, 3)
            and cos.shape == sin.shape
            and cos.shape[-1] == q.shape[-1]
            and q.shape[-1] % 2 == 0
            and q.dtype == k.dtype
        )
        if not fits:
            return original(q, k, cos, sin, unsqueeze_dim)
        half = q.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        if cos.dim() == 3 and cos.shape[0] != q.shape[0]:
            if cos.shape[0] != 1:
                return original(q, k, cos, sin, unsqueeze_dim)
            cos, sin = cos[0], sin[0]  # positions shared by every row
        if unsqueeze_dim == 1:
            q_out, k_out = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, T, H, D)
            return q_out.transpose(1, 2), k_out.transpose(1, 2)  # back to (B, H, T, D)
        return apply_rope(q, k, cos, sin)

    apply_rotary_pos_emb.__ease_kernels__ = True
    return apply_rotary_pos_emb


def _release_rope(module_name: str, model_id: int) -> None:
    """Drop one model from a swap; restore the original function when none is left."""
    swap = _ROPE_SWAPS.get(module_name)
    if swap is None:
        return
    swap.users.discard(model_id)
    if not swap.users:
        modeling = sys.modules.get(module_name)
        if modeling is not None:
            setattr(modeling, _ROPE_FUNCTION, swap.original)
        del _ROPE_SWAPS[module_name]


def _release_model(module_names: list[str], model_id: int) -> None:
    _PATCHED.pop(model_id, None)
    for name in module_names:
        _release_rope(name, model_id)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_llama` has patched ``model`` (and it has not been unpatched)."""
    return id(model) in _PATCHED


def patch_llama(model: nn.Module) -> nn.Module:
    """Run a Hugging Face Llama model's RMSNorms and RoPE through the ease kernels, in place.

    Args:
        model: a ``LlamaForCausalLM``, ``LlamaModel`` or any module holding
            ``LlamaRMSNorm`` / ``LlamaAttention`` submodules.

    Returns:
        ``model`` itself. Patching a patched model changes nothing. A deep copy of a
        patched model keeps the ease norms but is not registered: call ``patch_llama``
        (or :func:`unpatch`) on the copy too.

    Raises:
        TypeError: ``model`` holds no ``LlamaRMSNorm`` and no ``LlamaAttention``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_llama expects a Hugging Face Llama nn.Module, got {type(model).__name__}")
    if is_patched(model):
        return model
    norms = [module for module in model.modules() if _has_class(module, _NORM_CLASS)]
    attention_modules = sorted(
        {type(module).__module__ for module in model.modules() if _has_class(module, _ATTENTION_CLASS)}
    )
    if not norms and not attention_modules:
        raise TypeError(
            f"patch_llama expects a Hugging Face Llama model ({_NORM_CLASS} and {_ATTENTION_CLASS} "
            f"submodules), found neither in {type(model).__name__}"
        )
    for norm in norms:
        norm.forward = types.MethodType(_rms_norm_forward, norm)
    swapped = []
    for name in attention_modules:
        modeling = sys.modules.get(name)
        current = getattr(modeling, _ROPE_FUNCTION, None)
        if current is None:
            continue  # an attention class that does not rotate through this global
        if name not in _ROPE_SWAPS:
            _ROPE_SWAPS[name] = _RopeSwap(original=current)
            setattr(modeling, _ROPE_FUNCTION, _make_apply_rotary_pos_emb(current))
        _ROPE_SWAPS[name].users.add(id(model))
        swapped.append(name)
    # A model dropped without unpatch must not hold the global swap forever.
    finalizer = weakref.finalize(model, _release_model, swapped, id(model))
    _PATCHED[id(model)] = _PatchRecord(modules=swapped, finalizer=finalizer)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_llama` on ``model``: its norms get back the Hugging Face forward.

    The module-level ``apply_rotary_pos_emb`` is restored once no patched model is left.
    On a model that is not patched it only removes ease norm forwards a deep copy of a
    patched model carried over; otherwise it changes nothing.

    Returns:
        ``model`` itself.
    """
    for module in model.modules():
        bound = module.__dict__.get("forward")
        if isinstance(bound, types.MethodType) and bound.__func__ is _rms_norm_forward:
            del module.forward
    record = _PATCHED.get(id(model))
    if record is not None:
        record.finalizer.detach()
        _release_model(record.modules, id(model))
    return model
