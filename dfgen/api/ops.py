"""DeltaFormer attention as torch custom ops (torch.library), so that torch.compile traces a
model calling it without graph breaks. The kernel config travels as a JSON string, a
constant of the traced graph. Eager calls skip the op layer (dfgen.api.attention calls
the kernels directly); under torch.compile it calls these ops.

    dfgen::attn_fwd(q, k, v, beta?, config, scale) -> o
    dfgen::attn_fwd_train(q, k, v, beta?, config, scale) -> (o, u, a, lse)   differentiable in o
    dfgen::attn_bwd(q, k, beta?, u, a, lse, do, config, scale) -> (dq, dk, dv, dbeta)

scale is the softmax scale, always given (the caller turns None into 1/sqrt(D)).
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import torch
from torch import Tensor

from ..kernels.backward import backward
from ..kernels.config import KernelConfig
from ..kernels.flags import unpooled
from ..kernels.forward import forward
from .resolve import resolve_config


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> KernelConfig:
    return KernelConfig.from_dict(json.loads(text))


def _config(text: str, q: Tensor, needs_grad: bool) -> KernelConfig:
    """The config a traced call carries ('' = pick the tuned one for this GPU and shape)."""
    return resolve_config(_parse(text) if text else None, q, needs_grad)


@torch.library.custom_op("dfgen::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor], config: str,
             scale: float) -> Tensor:
    with unpooled():  # CUDA graph trees may run this in their memory pool (flags.py)
        return forward(q, k, v, beta, _config(config, q, False), scale=scale)[0]


@attn_fwd.register_fake
def _(q, k, v, beta, config, scale):
    return torch.empty_like(q)


@torch.library.custom_op("dfgen::attn_fwd_train", mutates_args=())
def attn_fwd_train(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor],
                   config: str, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # The traced op's outputs have shapes that do not depend on the config, so the reverse
    # sweep builds the in-chunk inverses itself here (eager calls keep the forward's)
    with unpooled():
        o, u, lse, a, _ = forward(q, k, v, beta, _config(config, q, True), for_backward=True,
                                  keep_inverse=False, scale=scale)
    return o, u, a, lse


@attn_fwd_train.register_fake
def _(q, k, v, beta, config, scale):
    B, T, H, _ = q.shape
    return (torch.empty_like(q), torch.empty_like(q), torch.empty_like(q),
            q.new_empty(B, H, T, dtype=torch.float32))


@torch.library.custom_op("dfgen::attn_bwd", mutates_args=())
def attn_bwd(q: Tensor, k: Tensor, beta: Optional[Tensor], u: Tensor, a: Tensor, lse: Tensor,
             do: Tensor, config: str, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = _config(config, q, True)
    if do.stride(-1) != 1:
        do = do.contiguous()
    with unpooled():
        dq, dk, dv, dbeta = backward(q, k, beta, u, a, lse, do, cfg.solve_bwd, cfg.attn_bwd,
                                     scale=scale)
    return dq, dk, dv, dbeta if dbeta is not None else q.new_empty(0)


@attn_bwd.register_fake
def _(q, k, beta, u, a, lse, do, config, scale):
    dbeta = torch.empty_like(beta) if beta is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(k), dbeta  # v is like k


def _setup_context(ctx, inputs, output):
    q, k, v, beta, config, scale = inputs
    _, u, a, lse = output
    ctx.save_for_backward(q, k, beta, u, a, lse)
    ctx.config, ctx.scale = config, scale
    ctx.has_beta = beta is not None


def _backward(ctx, do, du, da, dlse):
    q, k, beta, u, a, lse = ctx.saved_tensors
    dq, dk, dv, dbeta = torch.ops.dfgen.attn_bwd(q, k, beta, u, a, lse, do, ctx.config, ctx.scale)
    return dq, dk, dv, (dbeta if ctx.has_beta else None), None, None


attn_fwd_train.register_autograd(_backward, setup_context=_setup_context)
