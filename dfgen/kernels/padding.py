"""Launch arguments the stages share: the head dim a kernel is built for (narrow 16-bit
head dims are padded), and the packed-sequence arguments."""

from __future__ import annotations

import torch

# Narrowest head dim the kernels are built for in 16-bit types. Triton 3.6 miscompiles some
# 16-bit kernels whose tiles are 16 columns (32 bytes) wide for Hopper: the solve stage at
# CHUNK 64 ended in an illegal memory access or wrong results on the H200 at head dim 16
# in fp16 and bf16, while float32 (64-byte rows) and head dim 32 were right. Narrower
# 16-bit inputs are zero-padded to this width on the way in (padded columns add nothing
# to any score, and the extra output columns are dropped), so they run the head-dim-32
# kernels; the softmax scale stays 1/sqrt(the real head dim).
NARROWEST_16BIT_HEAD_DIM = 32


def kernel_head_dim(head_dim: int, dtype) -> int:
    """The head dim of the kernels that serve `head_dim` in `dtype`. Callers widen and
    narrow only when it differs: every stage call asks, so the common case is one compare."""
    if head_dim < NARROWEST_16BIT_HEAD_DIM and dtype in (torch.float16, torch.bfloat16):
        return NARROWEST_16BIT_HEAD_DIM
    return head_dim


def widen(t, width: int):
    """`t` [..., D] zero-padded to [..., width] (a new tensor); None stays None."""
    return None if t is None else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def narrow(t, width: int):
    """The first `width` columns of `t` as a contiguous tensor (outputs keep the strides a
    caller and torch.compile expect); None stays None."""
    return None if t is None else t[..., :width].contiguous()


def packing(seqs):
    """The (cu_seqlens, max_len) launch arguments."""
    return (None, None) if seqs is None else seqs
