"""DecodingCache: what decoding needs of one attention layer's past tokens.

Per batch row b, the keys k_j and the solved values u_j (u is per query head; k has the
key/value heads) of its first lengths[b] tokens. v is not kept: decoding never reads an
earlier v. Rows may hold different numbers of tokens (a padded or packed prefill); each
decoding step appends the same number of new tokens to every row, right after the row's
own last token. The buffers grow by doubling, so a step copies nothing in the common case;
lengths live on the device (the kernels read them, nothing waits for the GPU) and
`max_length`, an upper bound on every row's length, on the host.
"""

from __future__ import annotations

import torch

from ..errors import InputError


class DecodingCache:
    """One layer's cache. Made by `deltaformer_attn(..., return_cache=True)` (the prefill)
    and extended by `deltaformer_decode`; not built by hand."""

    def __init__(self, k: torch.Tensor, u: torch.Tensor, lengths: torch.Tensor, max_length: int,
                 scale: float | None):
        self._k = k  # [B, capacity, H_kv, D]; rows past a row's length are free
        self._u = u  # [B, capacity, H, D]
        self._lengths = lengths.to(torch.int32).contiguous()  # [B] on the device
        self._spare = torch.empty_like(self._lengths)  # the next step's lengths go here
        self.max_length = int(max_length)
        self.scale = scale  # the prefill's scale (None: 1/sqrt(D)); every step must use it

    @classmethod
    def full_rows(cls, k: torch.Tensor, u: torch.Tensor, scale=None) -> "DecodingCache":
        """Every row holds all T tokens of k [B, T, H_kv, D] and u [B, T, H, D] (referenced,
        not copied: the first step that appends moves them to larger buffers)."""
        B, T = k.shape[:2]
        return cls(k, u, torch.full((B,), T, dtype=torch.int32, device=k.device), T, scale)

    # -- what it holds ---------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._k.shape[0]

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held per row, int32 [B] on the device (a copy)."""
        return self._lengths.clone()

    def keys(self) -> torch.Tensor:
        """[B, max_length, H_kv, D]: row b's keys are its first lengths[b] entries."""
        return self._k[:, :self.max_length]

    def solved_values(self) -> torch.Tensor:
        """[B, max_length, H, D]: row b's u, its first lengths[b] entries."""
        return self._u[:, :self.max_length]

    def get_seq_length(self) -> int:
        """The longest row's length bound (Hugging Face's name)."""
        return self.max_length

    # -- changes ---------------------------------------------------------------------------
    def reserve(self, n: int) -> None:
        """Room for n more tokens per row: new buffers of twice the capacity (at least what
        is needed, in multiples of 64) when full, the held tokens copied."""
        needed = self.max_length + n
        if needed <= self.capacity:
            return
        capacity = -(-max(needed, 2 * self.capacity) // 64) * 64
        k, u = self._k, self._u
        self._k = k.new_empty((k.shape[0], capacity, *k.shape[2:]))
        self._u = u.new_empty((u.shape[0], capacity, *u.shape[2:]))
        self._k[:, :self.max_length] = k[:, :self.max_length]
        self._u[:, :self.max_length] = u[:, :self.max_length]

    def advanced(self, n: int) -> None:
        """After a step wrote n tokens per row (and lengths + n into the spare buffer)."""
        self._lengths, self._spare = self._spare, self._lengths
        self.max_length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search: each beam continues from another's past)."""
        if not isinstance(index, torch.Tensor) or index.dim() != 1:
            raise InputError("reorder: index must be a 1-D tensor of batch rows")
        index = index.to(self._k.device)
        self._k = self._k.index_select(0, index)
        self._u = self._u.index_select(0, index)
        self._lengths = self._lengths.index_select(0, index)
        self._spare = torch.empty_like(self._lengths)

    def __repr__(self) -> str:
        B, _, H_kv, D = self._k.shape
        return (f"DecodingCache(batch={B}, heads={self._u.shape[2]}, kv_heads={H_kv}, head_dim={D}, "
                f"max_length={self.max_length}, capacity={self.capacity}, dtype={self._k.dtype})")
