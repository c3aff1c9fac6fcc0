"""dfgen: generated and tuned Triton kernels for DeltaFormer attention.

    from dfgen import deltaformer_attn, deltaformer_decode, DeltaFormerAttention

Layers, each importing only those below it:
    dfgen.errors, dfgen.files, dfgen.settings, dfgen.reference   (the naive reference)
    dfgen.kernels   templates' specs, building, configs, host-side launch of each stage
    dfgen.select    buckets, tuned files, the dispatcher that picks a config per call
    dfgen.api       deltaformer_attn, deltaformer_decode and its cache, autograd,
                    torch.library ops, the layer
                    (dfgen.runtime and dfgen.layers re-export it)
    dfgen.tools     the `dfgen` command: tune, bench, check, emit, show
Importing dfgen compiles, tunes and creates nothing, and imports torch only when
deltaformer_attn, deltaformer_decode or DeltaFormerAttention is first asked for.
"""

from .version import __version__
__all__ = ["deltaformer_attn", "deltaformer_decode", "DeltaFormerAttention", "__version__"]


def __getattr__(name):
    if name == "deltaformer_attn":
        from .api.attention import deltaformer_attn

        return deltaformer_attn
    if name == "deltaformer_decode":
        from .api.decode import deltaformer_decode

        return deltaformer_decode
    if name == "DeltaFormerAttention":
        from .api.layers import DeltaFormerAttention

        return DeltaFormerAttention
    raise AttributeError(f"module 'dfgen' has no attribute {name!r}")
