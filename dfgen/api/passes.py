"""One eager pass of DeltaFormer attention under the runtime's config, as deltaformer_attn
and the prefill of a decoding cache both run it: the autograd Function where an input
requires grad, else the kernels directly; padding masks by packing (api/packing.py)."""

from __future__ import annotations

import torch

from ..kernels.forward import forward, forward_q_solve, inclusive_lse
from .autograd import AllPaddingFunction, DeltaFormerAttnFunction, DeltaFormerAttnQSolveFunction
from .inputs import check_cu_seqlens
from .packing import pack, packing, unpack, unpack_lse
from .resolve import resolve_config


def run_pass(q, k, v, beta, q_solve, config, seqs, *, large_beta: bool, scale, return_lse: bool,
             needs_grad: bool, return_u: bool = False):
    """(o, the attention's inclusive lse or None, u or None): o differentiable when
    needs_grad; lse and u (return_lse, return_u) never are."""
    variant = "qsolve" if q_solve is not None else ""
    config = resolve_config(config, q, needs_grad, seqs, variant=variant, large_beta=large_beta)
    if needs_grad:
        if q_solve is None:
            out = DeltaFormerAttnFunction.apply(q, k, v, beta, config, seqs, scale, return_lse,
                                                return_u)
        else:
            out = DeltaFormerAttnQSolveFunction.apply(q, q_solve, k, v, beta, config, seqs, scale,
                                                      return_lse, return_u)
        if not (return_lse or return_u):
            return out, None, None
        return out[0], out[1] if return_lse else None, out[-1] if return_u else None
    if q_solve is None:
        o, u, lse, _, _ = forward(q, k, v, beta, config, seqs=seqs, scale=scale)
        return o, inclusive_lse(q, k, lse, scale) if return_lse else None, u
    o, u, _, _, lse_attn, _ = forward_q_solve(q, q_solve, k, v, beta, config, seqs=seqs,
                                              scale=scale, return_lse=return_lse)
    return o, lse_attn, u


def run_padded(keep, q, k, v, beta, q_solve, config, *, large_beta: bool, scale,
               return_lse: bool, needs_grad: bool, return_u: bool = False):
    """A padding mask's pass (`keep`, [B, T] bool): the unpadded tokens of each row become
    one packed sequence, so padded positions reach no other position, in the solve stage
    too. Returns (o [B, T, H, D], zero where padded; lse [B, H, T], -inf where padded, or
    None; u of the packed tokens [1, n, H, D] or None; their flat index)."""
    B, T, H, D = q.shape
    index, cu = packing(keep)
    if index.numel() == 0:  # all padding: a zero output, still differentiable (zero grads)
        o = (AllPaddingFunction.apply(q, k, v, beta, q_solve) if needs_grad
             else q.new_zeros(B, T, H, D))
        lse = torch.full((B, H, T), float("-inf"), dtype=torch.float32, device=q.device)
        return o, lse if return_lse else None, None, index
    packed_q = pack(q, index)
    seqs = check_cu_seqlens(packed_q, cu)
    o, lse, u = run_pass(packed_q, pack(k, index), pack(v, index), pack(beta, index),
                         pack(q_solve, index), config, seqs, large_beta=large_beta, scale=scale,
                         return_lse=return_lse, needs_grad=needs_grad, return_u=return_u)
    return (unpack(o, index, B, T), unpack_lse(lse, index, B, T) if return_lse else None, u,
            index)
