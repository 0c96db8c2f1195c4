"""Building blocks of the EASE decoders, one idea per module."""

from ease.modules.attention import Attention
from ease.modules.block import TransformerBlock
from ease.modules.exit_head import ExitHead
from ease.modules.feed_forward import SwiGLU
from ease.modules.rms_norm import RMSNorm

__all__ = ["Attention", "ExitHead", "RMSNorm", "SwiGLU", "TransformerBlock"]
