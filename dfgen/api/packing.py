"""Padding masks as packed sequences: the unpadded tokens of each row of a [B, T] mask become
one sequence of cu_seqlens, so the kernels never see padding (deltaformer_attn's padded
path, the prefill's cache, the torch.compile ops)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def packing(keep: Tensor) -> tuple[Tensor, Tensor]:
    """(flat indices of the unpadded tokens of `keep` ([B, T] bool), cu_seqlens int32 [B+1]
    of the sequences they form, one per row)."""
    index = keep.flatten().nonzero().squeeze(1)
    cu = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=keep.device)
    cu[1:] = keep.sum(1).cumsum(0)
    return index, cu


def pack(t: Optional[Tensor], index: Tensor) -> Optional[Tensor]:
    """[B, T, ...] -> the rows at `index` as [1, n, ...] (None stays None)."""
    return None if t is None else t.reshape(-1, *t.shape[2:]).index_select(0, index).unsqueeze(0)


def unpack(packed: Tensor, index: Tensor, B: int, T: int, fill: float = 0.0) -> Tensor:
    """[1, n, ...] rows back to [B, T, ...], `fill` where padded (differentiable in packed)."""
    out = packed.new_full((B * T, *packed.shape[2:]), fill)
    return out.index_copy(0, index, packed[0]).view(B, T, *packed.shape[2:])


def unpack_lse(packed: Tensor, index: Tensor, B: int, T: int) -> Tensor:
    """A packed lse [1, H, n] back to [B, H, T], -inf where padded."""
    return unpack(packed.transpose(1, 2), index, B, T, float("-inf")).transpose(1, 2).contiguous()
