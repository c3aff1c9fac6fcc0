"""DeltaFormer attention as torch custom ops (torch.library), so that torch.compile traces a
model calling it without graph breaks. The kernel config travels as a JSON string, a
constant of the traced graph. Eager calls skip the op layer (dfgen.api.attention calls
the kernels directly); under torch.compile it calls these ops.

    dfgen::attn_fwd(q, k, v, beta?, cu_seqlens?, max_seqlen, config, scale) -> o
    dfgen::attn_fwd_train(q, k, v, beta?, cu_seqlens?, max_seqlen, config, scale)
        -> (o, u, a, lse)                                               differentiable in o
    dfgen::attn_bwd(q, k, beta?, u, a, lse, do, cu_seqlens?, max_seqlen, config, scale)
        -> (dq, dk, dv, dbeta)
    dfgen::attn_fwd_qsolve(q, q_solve, k, v, beta?, cu_seqlens?, max_seqlen, config, scale)
        -> (o, u, a, lse_solve, lse_attn)                               differentiable in o
    dfgen::attn_bwd_qsolve(q, q_solve, k, beta?, u, a, lse_solve, o, lse_attn, do,
        cu_seqlens?, max_seqlen, config, scale) -> (dq, dq_solve, dk, dv, dbeta)
    dfgen::attn_fwd_masked(q, k, v, beta?, attention_mask, config, scale) -> (o, lse)
                                                                        differentiable in o
    dfgen::attn_bwd_masked(q, k, v, beta?, attention_mask, do, config, scale)
        -> (dq, dk, dv, dbeta)

scale is the softmax scale, always given (the caller turns None into 1/sqrt(D));
max_seqlen (with cu_seqlens) the longest sequence, which sizes the launches without
reading the offsets back (0 without cu_seqlens). A padding mask packs the unpadded tokens,
whose number only the data knows, so its ops hide the packing: the forward keeps nothing
of it, and the backward runs the forward again (one more forward per training step).
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import torch
from torch import Tensor

from ..kernels.backward import backward, backward_q_solve
from ..kernels.config import KernelConfig
from ..kernels.flags import unpooled
from ..kernels.forward import forward, forward_q_solve, inclusive_lse
from .packing import pack, packing, unpack, unpack_lse
from .resolve import resolve_config


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> KernelConfig:
    return KernelConfig.from_dict(json.loads(text))


def _seqs(cu_seqlens: Optional[Tensor], max_seqlen: int):
    """The packed-sequence arguments of the kernels (None for a padded batch)."""
    if cu_seqlens is None:
        return None
    return cu_seqlens.to(torch.int32).contiguous(), max_seqlen


def _config(text: str, q: Tensor, needs_grad: bool, seqs=None, q_solve: bool = False) -> KernelConfig:
    """The config a traced call carries ('' = pick the tuned one for this GPU and shape)."""
    return resolve_config(_parse(text) if text else None, q, needs_grad, seqs,
                          variant="qsolve" if q_solve else "")


def _grad_like(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


# -- plain and packed sequences ------------------------------------------------------------
@torch.library.custom_op("dfgen::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor], cu_seqlens: Optional[Tensor],
             max_seqlen: int, config: str, scale: float) -> Tensor:
    seqs = _seqs(cu_seqlens, max_seqlen)
    with unpooled():  # CUDA graph trees may run this in their memory pool (flags.py)
        return forward(q, k, v, beta, _config(config, q, False, seqs), seqs=seqs, scale=scale)[0]


@attn_fwd.register_fake
def _(q, k, v, beta, cu_seqlens, max_seqlen, config, scale):
    return torch.empty_like(q)


@torch.library.custom_op("dfgen::attn_fwd_train", mutates_args=())
def attn_fwd_train(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor],
                   cu_seqlens: Optional[Tensor], max_seqlen: int, config: str,
                   scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # The traced op's outputs have shapes that do not depend on the config, so the reverse
    # sweep builds the in-chunk inverses itself here (eager calls keep the forward's)
    seqs = _seqs(cu_seqlens, max_seqlen)
    with unpooled():
        o, u, lse, a, _ = forward(q, k, v, beta, _config(config, q, True, seqs), for_backward=True,
                                  seqs=seqs, keep_inverse=False, scale=scale)
    return o, u, a, lse


@attn_fwd_train.register_fake
def _(q, k, v, beta, cu_seqlens, max_seqlen, config, scale):
    B, T, H, _ = q.shape
    return (torch.empty_like(q), torch.empty_like(q), torch.empty_like(q),
            q.new_empty(B, H, T, dtype=torch.float32))


@torch.library.custom_op("dfgen::attn_bwd", mutates_args=())
def attn_bwd(q: Tensor, k: Tensor, beta: Optional[Tensor], u: Tensor, a: Tensor, lse: Tensor,
             do: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int, config: str,
             scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    seqs = _seqs(cu_seqlens, max_seqlen)
    cfg = _config(config, q, True, seqs)
    if do.stride(-1) != 1:
        do = do.contiguous()
    with unpooled():
        dq, dk, dv, dbeta = backward(q, k, beta, u, a, lse, do, cfg.solve_bwd, cfg.attn_bwd,
                                     seqs=seqs, scale=scale)
    return dq, dk, dv, _grad_like(dbeta, q)


@attn_bwd.register_fake
def _(q, k, beta, u, a, lse, do, cu_seqlens, max_seqlen, config, scale):
    dbeta = torch.empty_like(beta) if beta is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(k), dbeta  # v is like k


def _setup_context(ctx, inputs, output):
    q, k, v, beta, cu_seqlens, max_seqlen, config, scale = inputs
    _, u, a, lse = output
    ctx.save_for_backward(q, k, beta, u, a, lse, cu_seqlens)
    ctx.max_seqlen, ctx.config, ctx.scale = max_seqlen, config, scale
    ctx.has_beta = beta is not None


def _backward(ctx, do, du, da, dlse):
    q, k, beta, u, a, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dbeta = torch.ops.dfgen.attn_bwd(q, k, beta, u, a, lse, do, cu_seqlens,
                                                 ctx.max_seqlen, ctx.config, ctx.scale)
    return dq, dk, dv, (dbeta if ctx.has_beta else None), None, None, None, None


attn_fwd_train.register_autograd(_backward, setup_context=_setup_context)


# -- the solve stage's own queries ---------------------------------------------------------
@torch.library.custom_op("dfgen::attn_fwd_qsolve", mutates_args=())
def attn_fwd_qsolve(q: Tensor, q_solve: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor],
                    cu_seqlens: Optional[Tensor], max_seqlen: int, config: str,
                    scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    seqs = _seqs(cu_seqlens, max_seqlen)
    cfg = _config(config, q, True, seqs, q_solve=True)
    with unpooled():
        o, u, lse_solve, a, lse_attn, _ = forward_q_solve(q, q_solve, k, v, beta, cfg,
                                                          for_backward=True, seqs=seqs,
                                                          scale=scale, keep_inverse=False)
    return o, u, a, lse_solve, lse_attn


@attn_fwd_qsolve.register_fake
def _(q, q_solve, k, v, beta, cu_seqlens, max_seqlen, config, scale):
    B, T, H, _ = q.shape
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(q), torch.empty_like(q), lse, torch.empty_like(lse)


@torch.library.custom_op("dfgen::attn_bwd_qsolve", mutates_args=())
def attn_bwd_qsolve(q: Tensor, q_solve: Tensor, k: Tensor, beta: Optional[Tensor], u: Tensor,
                    a: Tensor, lse_solve: Tensor, o: Tensor, lse_attn: Tensor, do: Tensor,
                    cu_seqlens: Optional[Tensor], max_seqlen: int, config: str,
                    scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    seqs = _seqs(cu_seqlens, max_seqlen)
    cfg = _config(config, q, True, seqs, q_solve=True)
    if do.stride(-1) != 1:
        do = do.contiguous()
    with unpooled():
        dq, dq_solve, dk, dv, dbeta = backward_q_solve(q, q_solve, k, beta, u, a, lse_solve, o,
                                                       lse_attn, do, cfg, seqs=seqs, scale=scale)
    return dq, dq_solve, dk, dv, _grad_like(dbeta, q)


@attn_bwd_qsolve.register_fake
def _(q, q_solve, k, beta, u, a, lse_solve, o, lse_attn, do, cu_seqlens, max_seqlen, config, scale):
    dbeta = torch.empty_like(beta) if beta is not None else q.new_empty(0)
    return (torch.empty_like(q), torch.empty_like(q), torch.empty_like(k), torch.empty_like(k),
            dbeta)


def _setup_qsolve(ctx, inputs, output):
    q, q_solve, k, v, beta, cu_seqlens, max_seqlen, config, scale = inputs
    o, u, a, lse_solve, lse_attn = output
    ctx.save_for_backward(q, q_solve, k, beta, u, a, lse_solve, o, lse_attn, cu_seqlens)
    ctx.max_seqlen, ctx.config, ctx.scale = max_seqlen, config, scale
    ctx.has_beta = beta is not None


def _backward_qsolve(ctx, do, du, da, dlse_solve, dlse_attn):
    q, q_solve, k, beta, u, a, lse_solve, o, lse_attn, cu_seqlens = ctx.saved_tensors
    dq, dq_solve, dk, dv, dbeta = torch.ops.dfgen.attn_bwd_qsolve(
        q, q_solve, k, beta, u, a, lse_solve, o, lse_attn, do, cu_seqlens, ctx.max_seqlen,
        ctx.config, ctx.scale)
    return dq, dq_solve, dk, dv, (dbeta if ctx.has_beta else None), None, None, None, None


attn_fwd_qsolve.register_autograd(_backward_qsolve, setup_context=_setup_qsolve)


# -- padding masks -------------------------------------------------------------------------
# (op bodies run below autograd: the packing and the backward are done here, by hand)
def _masked_packing(attention_mask: Tensor):
    """(flat index of the unpadded tokens, their sequences' (cu_seqlens, longest)), or
    (index, None) when every token is padding."""
    keep = attention_mask.bool()
    index, cu = packing(keep)
    return index, (cu, int(keep.sum(1).max())) if index.numel() else None


@torch.library.custom_op("dfgen::attn_fwd_masked", mutates_args=())
def attn_fwd_masked(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor], attention_mask: Tensor,
                    config: str, scale: float) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    index, seqs = _masked_packing(attention_mask)
    if seqs is None:
        return torch.zeros_like(q), torch.full((B, H, T), float("-inf"), dtype=torch.float32,
                                               device=q.device)
    qp, kp = pack(q, index), pack(k, index)
    with unpooled():
        o, _, lse, _, _ = forward(qp, kp, pack(v, index), pack(beta, index),
                                  _config(config, qp, False, seqs), seqs=seqs, scale=scale)
    return unpack(o, index, B, T), unpack_lse(inclusive_lse(qp, kp, lse, scale), index, B, T)


@attn_fwd_masked.register_fake
def _(q, k, v, beta, attention_mask, config, scale):
    B, T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("dfgen::attn_bwd_masked", mutates_args=())
def attn_bwd_masked(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor], attention_mask: Tensor,
                    do: Tensor, config: str, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, T = q.shape[:2]
    index, seqs = _masked_packing(attention_mask)
    if seqs is None:
        zero_beta = torch.zeros_like(beta) if beta is not None else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), _grad_like(zero_beta, q)
    qp, kp, bp = pack(q, index), pack(k, index), pack(beta, index)
    cfg = _config(config, qp, True, seqs)
    with unpooled():  # the forward again, then its backward
        _, u, lse, a, inv = forward(qp, kp, pack(v, index), bp, cfg, for_backward=True, seqs=seqs,
                                    scale=scale)
        dq, dk, dv, dbeta = backward(qp, kp, bp, u, a, lse, pack(do.contiguous(), index),
                                     cfg.solve_bwd, cfg.attn_bwd, seqs=seqs, inv=inv, scale=scale)
    return (unpack(dq, index, B, T), unpack(dk, index, B, T), unpack(dv, index, B, T),
            _grad_like(unpack(dbeta, index, B, T) if dbeta is not None else None, q))


@attn_bwd_masked.register_fake
def _(q, k, v, beta, attention_mask, do, config, scale):
    dbeta = torch.empty_like(beta) if beta is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbeta


def _setup_masked(ctx, inputs, output):
    q, k, v, beta, attention_mask, config, scale = inputs
    ctx.save_for_backward(q, k, v, beta, attention_mask)
    ctx.config, ctx.scale = config, scale
    ctx.has_beta = beta is not None


def _backward_masked(ctx, do, dlse):
    q, k, v, beta, attention_mask = ctx.saved_tensors
    dq, dk, dv, dbeta = torch.ops.dfgen.attn_bwd_masked(q, k, v, beta, attention_mask, do,
                                                        ctx.config, ctx.scale)
    return dq, dk, dv, (dbeta if ctx.has_beta else None), None, None, None


attn_fwd_masked.register_autograd(_backward_masked, setup_context=_setup_masked)
