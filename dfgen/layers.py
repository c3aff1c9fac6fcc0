"""The fla-compatible layer: `from dfgen.layers import DeltaFormerAttention` (it lives in
dfgen.api.layers)."""

from .api.cache import DecodingCache, DeltaFormerCache
from .api.layers import DeltaFormerAttention, RotaryEmbedding

__all__ = ["DeltaFormerAttention", "RotaryEmbedding", "DeltaFormerCache", "DecodingCache"]
