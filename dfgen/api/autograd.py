"""The autograd Functions of eager calls: the forward saves O(B*T*H*D) tensors and each
chunk's CHUNK x CHUNK inverse (O(B*T*H*CHUNK)), the backward runs the templated backward
kernels."""

from __future__ import annotations

import torch

from ..kernels.backward import backward, backward_q_solve
from ..kernels.forward import forward, forward_q_solve, inclusive_lse


class DeltaFormerAttnFunction(torch.autograd.Function):
    """Saves q, k, beta, u, a = P u, the strict lse and the in-chunk inverses (T * CHUNK
    values per head, the size of u at head dim CHUNK), so the reverse sweep need not build
    them again. With return_lse also the attention's (inclusive) lse, with return_u also u
    (what a prefill's cache keeps); neither is differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, beta, config, seqs, scale, return_lse, return_u):
        o, u, lse, a, inv = forward(q, k, v, beta, config, for_backward=True, seqs=seqs,
                                    scale=scale)
        ctx.save_for_backward(q, k, beta, u, a, lse, inv)
        ctx.config, ctx.seqs, ctx.scale = config, seqs, scale
        if not (return_lse or return_u):
            return o
        extra = ([inclusive_lse(q, k, lse, scale)] if return_lse else []) + ([u] if return_u else [])
        ctx.mark_non_differentiable(*extra)
        return (o, *extra)

    @staticmethod
    def backward(ctx, do, *_not_differentiable):
        q, k, beta, u, a, lse, inv = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv, dbeta = backward(q, k, beta, u, a, lse, do, ctx.config.solve_bwd,
                                     ctx.config.attn_bwd, seqs=ctx.seqs, inv=inv, scale=ctx.scale)
        return dq, dk, dv, dbeta, None, None, None, None, None


class DeltaFormerAttnQSolveFunction(torch.autograd.Function):
    """The two-stage form with the solve stage's own queries."""

    @staticmethod
    def forward(ctx, q, q_solve, k, v, beta, config, seqs, scale, return_lse, return_u):
        o, u, lse_solve, a, lse_attn, inv = forward_q_solve(q, q_solve, k, v, beta, config,
                                                            for_backward=True, seqs=seqs,
                                                            scale=scale)
        ctx.save_for_backward(q, q_solve, k, beta, u, a, lse_solve, o, lse_attn, inv)
        ctx.config, ctx.seqs, ctx.scale = config, seqs, scale
        if not (return_lse or return_u):
            return o
        # (the saved lse must not reach the caller, who may change it in place)
        extra = ([lse_attn.clone()] if return_lse else []) + ([u] if return_u else [])
        ctx.mark_non_differentiable(*extra)
        return (o, *extra)

    @staticmethod
    def backward(ctx, do, *_not_differentiable):
        q, q_solve, k, beta, u, a, lse_solve, o, lse_attn, inv = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dq_solve, dk, dv, dbeta = backward_q_solve(q, q_solve, k, beta, u, a, lse_solve, o,
                                                       lse_attn, do, ctx.config, seqs=ctx.seqs,
                                                       inv=inv, scale=ctx.scale)
        return dq, dq_solve, dk, dv, dbeta, None, None, None, None, None


class AllPaddingFunction(torch.autograd.Function):
    """The output of an all-padding attention_mask: zeros whose inputs get zero gradients."""

    @staticmethod
    def forward(ctx, q, k, v, beta, q_solve):
        ctx.shapes = [None if t is None else (t.shape, t.dtype, t.device) for t in (q, k, v, beta, q_solve)]
        return q.new_zeros(q.shape)

    @staticmethod
    def backward(ctx, do):
        return tuple(None if s is None else torch.zeros(s[0], dtype=s[1], device=s[2])
                     for s in ctx.shapes)
