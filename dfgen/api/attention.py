"""deltaformer_attn: what models call. Checks the inputs, picks the config, and routes the
call: eager (an autograd Function when an input requires grad), padded batches by packing,
or, under torch.compile, the dfgen:: custom ops.

Kernels are rendered and compiled at their first call; importing this module compiles,
tunes and checks nothing, and no call ever runs the reference or the tuner.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, InputError
from ..kernels.config import KernelConfig
from ..kernels.forward import inclusive_lse, softmax_scale
from .. import settings
from . import ops  # noqa: F401  (registers the dfgen:: custom ops that _traced calls)
from .inputs import (check_attention_mask, check_beta_range, check_cu_seqlens, check_flag,
                     check_inputs, check_large_beta, check_q_solve, check_scale)
from .decode import prefill
from .passes import run_padded, run_pass
from .resolve import CONFIG_TYPE


def deltaformer_attn(q, k, v, beta=None, *, q_solve=None, cu_seqlens=None, max_seqlen=None,
                     attention_mask=None, config: KernelConfig | dict | None = None,
                     large_beta: bool = False, scale: float | None = None,
                     return_lse: bool = False, return_cache: bool = False):
    """DeltaFormer attention: o = causal_softmax(q k^T) u, u = (I + diag(beta) P)^{-1} v.

    q: [B, T, H, D]; k, v: [B, T, H_kv, D], H a multiple of H_kv (grouped heads share keys
        and values; u is per query head); float16, bfloat16 or float32 on one CUDA device
        (or the CPU under TRITON_INTERPRET=1), unit stride on D.
    beta: [B, T, H] or None (all ones).
    q_solve: [B, T, H, D] queries of the solve stage's own scores (u = (I + diag(beta) P')^{-1} v,
        P' the strict softmax of q_solve k^T); None uses q. Takes the two-stage path.
    cu_seqlens: int32 [N+1] offsets of packed independent sequences in [1, total_T, H, D]
        tensors (beta [1, total_T, H]), as in fla; None for a padded batch.
    max_seqlen: with cu_seqlens, the longest sequence's length if known: the offsets are
        then trusted, not read back (no host sync, so CUDA graphs can capture the call).
        Bad offsets or a max_seqlen below the longest length give wrong rows, never an
        access out of bounds (the kernels clamp them); DFGEN_DEBUG=1 checks them on the
        host and raises InputError. Under torch.compile it is required with cu_seqlens.
    attention_mask: [B, T] of 0/1 (0 = padding, left or right), as in Hugging Face models:
        padded positions influence nothing and get a zero output. (Under torch.compile its
        values are not checked: nonzero is a token.)
    config: a KernelConfig or its dict form (missing sections come from the built-in
        default); None picks the tuned config for this GPU and shape (dfgen.select).
    large_beta: True when some |beta| may exceed 2 (a raw, un-squashed projection): the
        solve stages then build their in-chunk inverse from float32 products (tf32x3;
        slower). The default 16-bit configs build it from float16 products, right for
        |beta| <= 2 (sigmoid and 2 * sigmoid models) and not past it (the products cancel;
        NaN near beta = 8). DFGEN_DEBUG=1 checks |beta| <= 2 when large_beta is False.
    scale: the softmax scale of every score, s_ij = scale * q_i . k_j, in the solve and the
        attention alike (None: 1/sqrt(D)), as SDPA's and flash-attn's softmax_scale.
    return_lse: also return lse_i = logsumexp_{j<=i} s_ij (natural log, the causal row
        including the diagonal, as flash-attn's softmax_lse): [B, H, T] float32 ([1, H,
        total_T] with cu_seqlens; -inf at padded positions of an attention_mask). It is not
        differentiable.
    return_cache: also return the DecodingCache that deltaformer_decode continues from (a
        prefill; not under torch.compile yet).
    Returns o, [B, T, H, D], in q's dtype; differentiable in q, k, v, beta and q_solve;
    (o, lse) with return_lse, (o, cache) with return_cache, (o, lse, cache) with both.
    """
    check_inputs(q, k, v, beta)
    check_large_beta(large_beta)
    if scale is not None:
        scale = check_scale(scale)
    if return_lse is not False:
        check_flag("return_lse", return_lse)
    if return_cache is not False:
        check_flag("return_cache", return_cache)
    if torch.compiler.is_compiling():
        if return_cache:
            raise InputError("return_cache=True is not supported under torch.compile yet")
        return _traced(q, k, v, beta, q_solve, cu_seqlens, max_seqlen, attention_mask, config,
                       large_beta, scale, return_lse)
    if settings.DEBUG and beta is not None and not large_beta:
        check_beta_range(beta)
    if q_solve is not None:
        check_q_solve(q, q_solve)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, beta, q_solve))
    if return_cache:
        return prefill(q, k, v, beta, q_solve, cu_seqlens, max_seqlen, attention_mask, config,
                       large_beta=large_beta, scale=scale, return_lse=return_lse,
                       needs_grad=needs_grad)
    if attention_mask is not None:
        if cu_seqlens is not None:
            raise InputError("give attention_mask or cu_seqlens, not both")
        o, lse, _, _ = run_padded(check_attention_mask(attention_mask, q), q, k, v, beta, q_solve,
                                  config, large_beta=large_beta, scale=scale,
                                  return_lse=return_lse, needs_grad=needs_grad)
    else:
        seqs = check_cu_seqlens(q, cu_seqlens, max_seqlen) if cu_seqlens is not None else None
        o, lse, _ = run_pass(q, k, v, beta, q_solve, config, seqs, large_beta=large_beta,
                             scale=scale, return_lse=return_lse, needs_grad=needs_grad)
    return (o, lse) if return_lse else o


def _traced(q, k, v, beta, q_solve, cu_seqlens, max_seqlen, attention_mask, config, large_beta,
            scale, return_lse):
    """Under torch.compile: the call as custom ops (no graph break). The config travels as
    a JSON constant and is resolved inside the op, where tuned files may be read."""
    if large_beta:
        raise InputError("large_beta=True is not supported under torch.compile yet; pass a "
                         "config whose solve and solve_bwd sections set INV_FP16: false")
    if isinstance(config, dict):
        raise InputError("under torch.compile pass config as a KernelConfig (or None)")
    if config is not None and not isinstance(config, KernelConfig):
        raise ConfigError(CONFIG_TYPE.format(type(config).__name__))
    text = config.json if config is not None else ""
    scale = softmax_scale(q.shape[3], scale)  # a constant of the traced graph
    if attention_mask is not None:
        if cu_seqlens is not None:
            raise InputError("give attention_mask or cu_seqlens, not both")
        if q_solve is not None:
            raise InputError("attention_mask with q_solve is not supported under torch.compile yet")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != q.shape[:2]:
            raise InputError(f"attention_mask must be a [B, T] = {tuple(q.shape[:2])} tensor of 0/1")
        o, lse = torch.ops.dfgen.attn_fwd_masked(q, k, v, beta, attention_mask, text, scale)
        return (o, lse) if return_lse else o
    cu, longest = None, 0
    if cu_seqlens is not None:
        if max_seqlen is None:
            raise InputError("under torch.compile, cu_seqlens needs max_seqlen (the longest "
                             "sequence): reading it from the offsets would break the graph")
        cu, longest = check_cu_seqlens(q, cu_seqlens, max_seqlen)
    if q_solve is not None:
        check_q_solve(q, q_solve)
        o, _, _, _, lse_attn = torch.ops.dfgen.attn_fwd_qsolve(q, q_solve, k, v, beta, cu, longest,
                                                                text, scale)
        return (o, lse_attn.detach()) if return_lse else o
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, beta))
    if needs_grad or return_lse:
        o, _, _, lse = torch.ops.dfgen.attn_fwd_train(q, k, v, beta, cu, longest, text, scale)
        if return_lse:
            return o, inclusive_lse(q.detach(), k.detach(), lse.detach(), scale)
        return o
    return torch.ops.dfgen.attn_fwd(q, k, v, beta, cu, longest, text, scale)


__all__ = ["deltaformer_attn"]
