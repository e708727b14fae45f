"""``nn.Module`` replacements that call the fused ops."""

from .lowrank import LowRankLinear
from .quantized import QuantLowRankLinear

__all__ = ["LowRankLinear", "QuantLowRankLinear"]
