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

from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(eq=False)
class DecodingCache:
    """One layer's cache. Made by `deltaformer_attn(..., return_cache=True)` (the prefill)
    and extended by `deltaformer_decode`; not built by hand.

    k: [B, capacity, H_kv, D] and u: [B, capacity, H, D] buffers (row b's first lengths[b]
    entries hold its tokens; the rest are free); lengths: int32 [B] on the device;
    max_length: a host bound on every length; scale: the prefill's softmax scale (None:
    1/sqrt(D)); q_solve: whether u came from the solve's own queries. A dataclass, so that
    caches that map a function over their layers' tensors (fla's and Hugging Face's reorder
    for beam search, batch repeats) reach k, u and lengths.
    """

    k: torch.Tensor
    u: torch.Tensor
    lengths: torch.Tensor
    max_length: int
    scale: float | None = None
    q_solve: bool = False  # u solved from the solve's own queries (decode with q_solve too)

    def __post_init__(self):
        if not isinstance(self.lengths, torch.Tensor):
            raise InputError(f"DecodingCache.lengths must be an int32 [B] tensor, got "
                             f"{type(self.lengths).__name__}")
        self.lengths = self.lengths.to(torch.int32).contiguous()
        self._spare = torch.empty_like(self.lengths)  # the next step's lengths go here

    @classmethod
    def full_rows(cls, k: torch.Tensor, u: torch.Tensor, scale=None,
                  q_solve: bool = False) -> "DecodingCache":
        """Every row holds all T tokens of k [B, T, H_kv, D] and u [B, T, H, D] (referenced,
        not copied: the first step that appends moves them to larger buffers)."""
        B, T = k.shape[:2]
        return cls(k, u, torch.full((B,), T, dtype=torch.int32, device=k.device), T, scale, q_solve)

    def validate(self) -> None:
        """InputError naming the field unless the buffers fit each other (a cache is input: the
        kernels write into k and u at rows given by lengths). Checked again only after one of
        them was replaced."""
        held = (self.k, self.u, self.lengths, self._spare)
        if getattr(self, "_valid", None) is None or not all(a is b for a, b in zip(held, self._valid)):
            self._validate_buffers()
            self._valid = held
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or \
                not 0 <= self.max_length <= self.k.shape[1]:
            raise InputError(f"DecodingCache.max_length must be an int in [0, capacity], got "
                             f"{self.max_length!r}")

    def _validate_buffers(self) -> None:
        k, u, lengths = self.k, self.u, self.lengths
        for name, t in (("k", k), ("u", u)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise InputError(f"DecodingCache.{name} must be a [B, capacity, heads, D] tensor")
            if t.stride(-1) != 1:
                raise InputError(f"DecodingCache.{name} must be contiguous in its last dim")
        if (k.shape[0], k.shape[1], k.shape[3]) != (u.shape[0], u.shape[1], u.shape[3]) or \
                k.shape[2] < 1 or u.shape[2] % k.shape[2]:
            raise InputError(f"DecodingCache.k {tuple(k.shape)} and .u {tuple(u.shape)} must share "
                             "batch, capacity and head dim, u's heads a multiple of k's")
        if k.dtype != u.dtype or k.device != u.device:
            raise InputError("DecodingCache.k and .u must have one dtype and device")
        for name, t in (("lengths", lengths), ("_spare", self._spare)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.shape != (k.shape[0],) \
                    or t.device != k.device or not t.is_contiguous():
                raise InputError(f"DecodingCache.{name} must be a contiguous int32 [B] tensor on the "
                                 "cache's device")

    # -- what it holds ---------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def keys(self) -> torch.Tensor:
        """[B, max_length, H_kv, D]: row b's keys are its first lengths[b] entries."""
        return self.k[:, :self.max_length]

    def solved_values(self) -> torch.Tensor:
        """[B, max_length, H, D]: row b's u, its first lengths[b] entries."""
        return self.u[:, :self.max_length]

    def get_seq_length(self) -> int:
        """The longest row's length bound (Hugging Face's name)."""
        return self.max_length

    # -- changes ---------------------------------------------------------------------------
    def reserve(self, n: int) -> None:
        """Room for n more tokens per row: new buffers of twice the capacity (at least what
        is needed, in multiples of 64) when full, the held tokens copied. The rows past them
        start as zeros, not as whatever the allocator held: a corrupted length (clamped by
        the kernels to the capacity) then reads finite rows, never stale memory (one memset
        per doubling)."""
        needed = self.max_length + n
        if needed <= self.capacity:
            return
        capacity = -(-max(needed, 2 * self.capacity) // 64) * 64
        k, u = self.k, self.u
        self.k = k.new_zeros((k.shape[0], capacity, *k.shape[2:]))
        self.u = u.new_zeros((u.shape[0], capacity, *u.shape[2:]))
        self.k[:, :self.max_length] = k[:, :self.max_length]
        self.u[:, :self.max_length] = u[:, :self.max_length]

    def advanced(self, n: int) -> None:
        """After a step wrote n tokens per row (and lengths + n into the spare buffer)."""
        self.lengths, self._spare = self._spare, self.lengths
        self.max_length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search: each beam continues from another's past)."""
        if not isinstance(index, torch.Tensor) or index.dim() != 1:
            raise InputError("reorder: index must be a 1-D tensor of batch rows")
        index = index.to(self.k.device)
        self.k = self.k.index_select(0, index)
        self.u = self.u.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self._spare = torch.empty_like(self.lengths)

    def __repr__(self) -> str:
        B, _, H_kv, D = self.k.shape
        return (f"DecodingCache(batch={B}, heads={self.u.shape[2]}, kv_heads={H_kv}, head_dim={D}, "
                f"max_length={self.max_length}, capacity={self.capacity}, dtype={self.k.dtype})")


class DeltaFormerCache:
    """A model's decoding state: one DecodingCache per attention layer, shaped like fla's
    Cache (and Hugging Face's Cache protocol as fla's models use it), for models that do
    not have one: `update(recurrent_state=..., layer_idx=i, offset=n)` stores layer i's state
    and counts its tokens, `cache[i]` is layer i's state dict ({"recurrent_state": ...}),
    `get_seq_length(i)` the tokens layer i has seen. dfgen's layer keeps its DecodingCache
    under "recurrent_state", in this cache or in fla's alike."""

    def __init__(self):
        self.states: list[dict | None] = []
        self._seen: list[int] = []

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None,
               layer_idx: int = 0, offset: int | None = 1, cache_kwargs=None) -> dict:
        while len(self.states) <= layer_idx:
            self.states.append(None)
            self._seen.append(0)
        state = self.states[layer_idx]
        if state is None:
            state = self.states[layer_idx] = dict(recurrent_state=None, attn_state=None,
                                                  conv_state=None, ffn_state=None)
        for name, value in (("recurrent_state", recurrent_state), ("attn_state", attn_state),
                            ("conv_state", conv_state), ("ffn_state", ffn_state)):
            if value is not None:
                state[name] = value
        self._seen[layer_idx] += 1 if offset is None else offset
        return state

    def __getitem__(self, layer_idx: int) -> dict:
        if not 0 <= layer_idx < len(self.states) or self.states[layer_idx] is None:
            raise KeyError(f"the cache holds no state for layer {layer_idx}")
        return self.states[layer_idx]

    def __len__(self) -> int:
        return len(self.states)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        layer_idx = layer_idx or 0
        return self._seen[layer_idx] if layer_idx < len(self._seen) else 0

    def _caches(self):
        return [s["recurrent_state"] for s in self.states
                if s is not None and isinstance(s.get("recurrent_state"), DecodingCache)]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for cache in self._caches():
            cache.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self._caches():
            rows = torch.arange(cache.batch_size, device=cache.k.device)
            cache.reorder(rows.repeat_interleave(repeats))

    def reset(self) -> None:
        self.states, self._seen = [], []
