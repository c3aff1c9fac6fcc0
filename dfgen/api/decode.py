"""deltaformer_decode: generation after a prefill. Each call takes n new tokens per batch
row (one for plain decoding; several for speculative decoding or a continued prefill),
attends over the cache and the new tokens before each, solves their u and appends (k, u)
to the cache, in two kernel launches (templates/decode.py.jinja).

For one new token t after the cache's keys K and solved values U:
    s_tj = scale q_t . k_j (j < t),  lse_t = logsumexp_{j<t} s_tj,
    a_t = sum_{j<t} softmax(s_t)_j u_j,  u_t = v_t - beta_t a_t,
    o_t = g_t a_t + (1 - g_t) u_t,  g_t = sigmoid(lse_t - s_tt),
exactly the rows that deltaformer_attn would give the whole sequence.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import InputError
from ..kernels.decode import decode_knobs, decode_step
from ..kernels.forward import softmax_scale
from ..select.dispatch import dispatcher_for
from .cache import DecodingCache
from .packing import pack
from .passes import run_padded, run_pass
from .inputs import (check_attention_mask, check_cu_seqlens, check_flag, check_inputs,
                     check_q_solve, check_scale)

_knobs_memo: dict = {}
MANY_NEW_TOKENS = 256  # past this many new tokens a step, a prefill of everything is faster
_warned_lengths: set = set()


def deltaformer_decode(q, k, v, beta, cache: DecodingCache, *, q_solve=None,
                       scale: float | None = None, config: dict | None = None,
                       return_lse: bool = False):
    """The outputs of n new tokens per row, appended to `cache`.

    q: [B, n, H, D]; k, v: [B, n, H_kv, D]; beta: [B, n, H] or None (ones), as for
        deltaformer_attn; B, H, H_kv, D, dtype and device those of the cache.
    cache: the DecodingCache of this layer (from deltaformer_attn(..., return_cache=True));
        gets the n tokens' keys and u.
    q_solve: [B, n, H, D], the solve's own queries, where the prefill had them (u from
        q_solve's scores, o from q's: the cache is swept once for each).
    scale: the softmax scale; None takes the prefill's (a different one is an error: the
        cached u were solved under it).
    config: the decoding step's knobs (templates/decode.py.jinja), each optional (those left
        out: the built-in default's). None: the tuned file's decode entry nearest this step's
        bucket (dtype, head dim, the cache's length rounded up to a power of two, batch *
        heads; dfgen.select.dispatch), else the built-in default.
    return_lse: also return each new token's inclusive lse, [B, H, n] float32.
    Returns o [B, n, H, D] in q's dtype (not differentiable); (o, lse) with return_lse.
    """
    check_inputs(q, k, v, beta)
    if not isinstance(cache, DecodingCache):
        raise InputError(f"cache must be the DecodingCache of a prefill "
                         f"(deltaformer_attn(..., return_cache=True)), got {type(cache).__name__}")
    _check_against_cache(q, k, cache)
    if q_solve is not None:
        check_q_solve(q, q_solve)
    if (q_solve is not None) != cache.q_solve:
        raise InputError("q_solve must be given to deltaformer_decode exactly when the prefill "
                         f"had it (this cache's prefill {'did' if cache.q_solve else 'did not'})")
    prefill_scale = softmax_scale(q.shape[3], cache.scale)
    if scale is not None and not math.isclose(check_scale(scale), prefill_scale, rel_tol=1e-9):
        raise InputError(f"scale={scale} differs from the prefill's ({prefill_scale}): the cached "
                         "u were solved under it")
    if return_lse is not False:
        check_flag("return_lse", return_lse)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta)):
        raise InputError("deltaformer_decode is not differentiable: call it under "
                         "torch.no_grad() or torch.inference_mode()")
    if torch.compiler.is_compiling():
        raise InputError("deltaformer_decode is not supported under torch.compile yet")
    knobs = _knobs(config, q, cache.max_length)
    n = q.shape[1]
    if n > MANY_NEW_TOKENS and n not in _warned_lengths:
        _warned_lengths.add(n)
        warnings.warn(f"deltaformer_decode: {n} new tokens per row are walked one after another "
                      "(the work grows as n^2): for a long continuation, a prefill of the whole "
                      "sequence (deltaformer_attn(..., return_cache=True)) is faster",
                      RuntimeWarning, stacklevel=2)
    cache.reserve(n)
    out = decode_step(q, k, v, beta, cache.k, cache.u, cache.lengths, cache._spare,
                      cache.max_length, knobs, scale=prefill_scale, return_lse=return_lse,
                      q_solve=q_solve)
    cache.advanced(n)
    return out


def _check_against_cache(q, k, cache: DecodingCache) -> None:
    cache.validate()
    B, _, H, D = q.shape
    ck, cu = cache.k, cache.u
    if (B, k.shape[2], D) != (ck.shape[0], ck.shape[2], ck.shape[3]) or H != cu.shape[2]:
        raise InputError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit the cache: it holds "
                         f"batch {ck.shape[0]}, {cu.shape[2]} heads, {ck.shape[2]} key/value heads, "
                         f"head dim {ck.shape[3]}")
    if q.dtype != ck.dtype or q.device != ck.device:
        raise InputError(f"q is {q.dtype} on {q.device}; the cache holds {ck.dtype} on {ck.device}")


def _knobs(config, q, cache_length: int) -> dict:
    """The step's knobs: `config` over the built-in default (memoized), or with config None
    what the dispatcher picks for the step's decode bucket (memoized there)."""
    B, _, H, head_dim = q.shape
    dtype = q.dtype
    if config is None:
        return dispatcher_for(q.device).decode_step_knobs(dtype, head_dim, cache_length, B * H)
    if not isinstance(config, dict):
        raise InputError(f"config must be a dict of decode knobs or None, got {type(config).__name__}")
    try:
        key = (head_dim, dtype, tuple(sorted(config.items())) if config else ())
        found = _knobs_memo.get(key)
    except TypeError:  # unhashable or unorderable knobs: checked (and refused) below
        found, key = None, None
    if found is None:
        found = decode_knobs(config, head_dim, dtype)
        if key is not None and len(_knobs_memo) < 1024:
            _knobs_memo[key] = found
    return found


# -- prefill: the cache of what deltaformer_attn computed --------------------------------------
def cache_of_padded_batch(k, u, keep, scale) -> DecodingCache:
    """The cache of an attention_mask prefill: row b holds its unpadded tokens (`keep`, [B, T]
    bool) in order, from the packed k [1, total, H_kv, D] and u [1, total, H, D]."""
    B, T = keep.shape
    positions = keep.to(torch.int64).cumsum(1) - 1  # each kept token's place in its row
    rows = torch.arange(B, device=keep.device).unsqueeze(1).expand(B, T)
    dest = (rows * T + positions)[keep]
    return DecodingCache(_scatter_rows(k[0], dest, B, T), _scatter_rows(u[0], dest, B, T),
                         keep.sum(1), T, scale)


def cache_of_packed_sequences(k, u, cu_seqlens, longest: int, scale) -> DecodingCache:
    """The cache of a cu_seqlens prefill: row r holds sequence r of the packed k and u. As in
    the kernels, offsets that were trusted (max_seqlen given) and are wrong give wrong rows,
    never an index out of the cache: every place is clamped into its row."""
    total = k.shape[1]
    n_seqs = cu_seqlens.numel() - 1
    starts = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total, device=k.device)
    rows = torch.searchsorted(starts[1:].contiguous(), tokens, right=True).clamp(max=n_seqs - 1)
    place = (tokens - starts[rows]).clamp(0, longest - 1)
    lengths = (starts[1:] - starts[:-1]).clamp(0, longest)
    return DecodingCache(_scatter_rows(k[0], rows * longest + place, n_seqs, longest),
                         _scatter_rows(u[0], rows * longest + place, n_seqs, longest), lengths,
                         longest, scale)


def _scatter_rows(packed, dest, B: int, T: int):
    """[total, H, D] rows placed at flat positions `dest` of a [B, T, H, D] buffer."""
    out = packed.new_zeros((B * T, *packed.shape[1:]))
    out.index_copy_(0, dest, packed)
    return out.view(B, T, *packed.shape[1:])


__all__ = ["deltaformer_decode", "DecodingCache"]


def prefill(q, k, v, beta, q_solve, cu_seqlens, max_seqlen, attention_mask, config, *,
            large_beta: bool, scale, return_lse: bool, needs_grad: bool):
    """deltaformer_attn(..., return_cache=True), its inputs checked: the pass
    (differentiable when needs_grad), then its cache (padded batches: every row full;
    attention_mask: each row's unpadded tokens; cu_seqlens: one row per sequence). Returns
    (o, cache), or (o, lse, cache) with return_lse."""
    run = dict(large_beta=large_beta, scale=scale, return_lse=return_lse, needs_grad=needs_grad,
               return_u=True)
    if attention_mask is not None:
        if cu_seqlens is not None:
            raise InputError("give attention_mask or cu_seqlens, not both")
        keep = check_attention_mask(attention_mask, q)
        o, lse, u, index = run_padded(keep, q, k, v, beta, q_solve, config, **run)
        if u is None:  # all padding: every row empty
            B, T = keep.shape
            cache = DecodingCache(k.new_zeros(k.shape), q.new_zeros(q.shape),
                                  torch.zeros(B, dtype=torch.int32, device=q.device), T, scale)
        else:
            cache = cache_of_padded_batch(pack(k, index).detach(), u, keep, scale)
    elif cu_seqlens is not None:
        seqs = check_cu_seqlens(q, cu_seqlens, max_seqlen)
        o, lse, u = run_pass(q, k, v, beta, q_solve, config, seqs, **run)
        cache = cache_of_packed_sequences(k.detach(), u, seqs[0], seqs[1], scale)
    else:
        o, lse, u = run_pass(q, k, v, beta, q_solve, config, None, **run)
        cache = DecodingCache.full_rows(k.detach(), u, scale)
    cache.q_solve = q_solve is not None
    return (o, lse, cache) if return_lse else (o, cache)
