"""ease_kernels: fused Triton kernels for early-exit transformers, each beside its reference.

Every op takes its Triton kernel when :func:`ease_kernels.dispatch.use_triton` says so
(CUDA tensors with Triton present, by default) and its plain PyTorch reference otherwise;
``EASE_KERNELS=auto|triton|reference`` or :func:`set_backend` changes the rule.
"""

from ease_kernels.dispatch import backend, get_backend, set_backend, triton_available, use_triton
from ease_kernels.exit_confidence import ExitDecision, exit_confidence, exit_confidence_reference
from ease_kernels.exit_head_loss import ExitHeadLoss, exit_head_confidence, exit_head_loss, exit_head_loss_reference
from ease_kernels.hf_patch import is_patched, patch_llama, unpatch
from ease_kernels.rms_norm import rms_norm, rms_norm_reference
from ease_kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin, rope_inv_freq

__all__ = [
    "ExitDecision",
    "ExitHeadLoss",
    "apply_rope",
    "apply_rope_reference",
    "backend",
    "exit_confidence",
    "exit_confidence_reference",
    "exit_head_confidence",
    "exit_head_loss",
    "exit_head_loss_reference",
    "get_backend",
    "is_patched",
    "patch_llama",
    "rms_norm",
    "rms_norm_reference",
    "rope_cos_sin",
    "rope_inv_freq",
    "set_backend",
    "triton_available",
    "unpatch",
    "use_triton",
]
