"""The import models use: `from dfgen.runtime import deltaformer_attn`.

deltaformer_attn lives in dfgen.api.attention, deltaformer_decode (generation after a
prefill with return_cache=True) in dfgen.api.decode; this module keeps the promised import path.
Importing it compiles, tunes and checks nothing (kernels build at their first call).
"""

from .api.attention import deltaformer_attn
from .api.cache import DecodingCache
from .api.decode import deltaformer_decode
from .api.inputs import SUPPORTED_DTYPES
from .kernels.config import SUPPORTED_HEAD_DIMS

__all__ = ["deltaformer_attn", "deltaformer_decode", "DecodingCache", "SUPPORTED_DTYPES",
           "SUPPORTED_HEAD_DIMS"]
