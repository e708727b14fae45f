"""``nn.Module`` replacements that call the fused ops."""
from .lowrank import LowRankLinear

__all__ = ["LowRankLinear"]
