"""What models import: deltaformer_attn(q, k, v, beta=None, *, config=None).

Importing this module compiles, tunes and imports nothing heavy; kernels are rendered
and compiled at their first call. When an input requires grad, the call goes through an
autograd Function whose backward runs the templated backward kernels.
"""

from __future__ import annotations

import os

import torch

from .backward import backward, backward_q_solve
from .config import FLOAT32_ACCURATE, SUPPORTED_HEAD_DIMS, KernelConfig, default_config
from .dispatch import dispatcher_for
from .errors import ConfigError, InputError
from .forward import forward, forward_q_solve
from .interpreter import interpreter_active
from . import ops  # noqa: F401  (registers the dfgen:: custom ops for torch.compile)

__all__ = ["deltaformer_attn", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# DFGEN_DEBUG=1 (read at import): checks that cost a host sync, e.g. cu_seqlens against
# max_seqlen, which are otherwise trusted (the kernels only clamp them to stay in bounds)
DEBUG = os.environ.get("DFGEN_DEBUG", "0") == "1"


_CONFIG_TYPE = "config must be a KernelConfig, a dict or None, got {}"
_VALID_SIGNATURES: set = set()  # inputs already checked, by what the checks look at


def _signature(q, k, v, beta):
    """What _check_inputs depends on, or None when it cannot be read cheaply."""
    try:
        return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
                v.device, q.stride(-1), k.stride(-1), v.stride(-1),
                None if beta is None else (beta.shape, beta.dtype, beta.device))
    except (AttributeError, TypeError, RuntimeError, IndexError):
        return None


def _check_inputs(q, k, v, beta):
    """Raise InputError naming the argument when the inputs are not what the kernels take.
    Passing signatures of CUDA inputs are remembered, so a training loop pays a set lookup
    per call (CPU inputs also depend on TRITON_INTERPRET, read at each call)."""
    sig = _signature(q, k, v, beta)
    if sig is not None and sig in _VALID_SIGNATURES:
        return
    _check_inputs_fully(q, k, v, beta)
    if sig is not None and q.is_cuda and len(_VALID_SIGNATURES) < 4096 and (
            type(q) is torch.Tensor and (beta is None or type(beta) is torch.Tensor)):
        _VALID_SIGNATURES.add(sig)


def _check_inputs_fully(q, k, v, beta):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must be [B, T, H, D] (4 dims), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise InputError(f"k and v must have the same shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise InputError(f"k and v must be [B, T, H_kv, D] with q's B, T and D; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] < 1 or H % k.shape[2]:
        raise InputError(f"q's heads ({H}) must be a multiple of k and v's heads ({k.shape[2]})")
    if T < 1 or B < 1 or H < 1:
        raise InputError(f"q must have B, T, H >= 1, got shape {tuple(q.shape)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise InputError(f"head dim D={D} is not supported; expected one of {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"q has dtype {q.dtype}; expected float16, bfloat16 or float32")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InputError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise InputError(f"{name} is on {t.device} but q is on {q.device}")
    if beta is not None:
        if not isinstance(beta, torch.Tensor):
            raise InputError(f"beta must be a torch.Tensor or None, got {type(beta).__name__}")
        if tuple(beta.shape) != (B, T, H):
            raise InputError(f"beta must have shape [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
        if beta.device != q.device:
            raise InputError(f"beta is on {beta.device} but q is on {q.device}")
        if not beta.is_floating_point():
            raise InputError(f"beta must be a floating tensor, got {beta.dtype}")
    if q.device.type == "cpu":
        if not interpreter_active():
            raise InputError("q is on the CPU: dfgen's kernels need a CUDA device, or "
                             "TRITON_INTERPRET=1 to run them (slowly) in Triton's interpreter")
    elif q.device.type != "cuda":
        raise InputError(f"q is on {q.device}; dfgen runs on CUDA devices")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise InputError(f"{name} must be contiguous in its last dim (stride 1), "
                             f"got strides {t.stride()}")


class _DeltaFormerAttn(torch.autograd.Function):
    """Saves q, k, beta, u, a = P u and the strict lse: O(B*T*H*D), no C x C matrices."""

    @staticmethod
    def forward(ctx, q, k, v, beta, config, seqs):
        o, u, lse, a = forward(q, k, v, beta, config, for_backward=True, seqs=seqs)
        ctx.save_for_backward(q, k, beta, u, a, lse)
        ctx.config, ctx.seqs = config, seqs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, beta, u, a, lse = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv, dbeta = backward(q, k, beta, u, a, lse, do, ctx.config.solve_bwd,
                                     ctx.config.attn_bwd, seqs=ctx.seqs)
        return dq, dk, dv, dbeta, None, None


class _DeltaFormerAttnQSolve(torch.autograd.Function):
    """The two-stage form with the solve stage's own queries."""

    @staticmethod
    def forward(ctx, q, q_solve, k, v, beta, config, seqs):
        o, u, lse_solve, a, lse_attn = forward_q_solve(q, q_solve, k, v, beta, config,
                                                       for_backward=True, seqs=seqs)
        ctx.save_for_backward(q, q_solve, k, beta, u, a, lse_solve, o, lse_attn)
        ctx.config, ctx.seqs = config, seqs
        return o

    @staticmethod
    def backward(ctx, do):
        q, q_solve, k, beta, u, a, lse_solve, o, lse_attn = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dq_solve, dk, dv, dbeta = backward_q_solve(q, q_solve, k, beta, u, a, lse_solve, o,
                                                       lse_attn, do, ctx.config, seqs=ctx.seqs)
        return dq, dq_solve, dk, dv, dbeta, None, None


class _AllPadding(torch.autograd.Function):
    """The output of an all-padding attention_mask: zeros whose inputs get zero gradients."""

    @staticmethod
    def forward(ctx, q, k, v, beta, q_solve):
        ctx.shapes = [None if t is None else (t.shape, t.dtype, t.device) for t in (q, k, v, beta, q_solve)]
        return q.new_zeros(q.shape)

    @staticmethod
    def backward(ctx, do):
        return tuple(None if s is None else torch.zeros(s[0], dtype=s[1], device=s[2])
                     for s in ctx.shapes)


_as_two_stage: dict = {}


def _two_stage(config: KernelConfig, head_dim: int, dtype) -> KernelConfig:
    """A separate solve query needs the two-stage strategy: keep the solve knobs, take the
    attention stage's from the built-in default if the config has none (memoized)."""
    if config.strategy == "two_stage":
        return config
    memo = (config.key(), head_dim, dtype)
    found = _as_two_stage.get(memo)
    if found is None:
        attn = default_config(head_dim, dtype, strategy="two_stage").attn
        found = KernelConfig("two_stage", config.solve, attn, config.solve_bwd, config.attn_bwd)
        _as_two_stage[memo] = found
    return found


def _check_q_solve(q, q_solve):
    if not isinstance(q_solve, torch.Tensor):
        raise InputError(f"q_solve must be a torch.Tensor or None, got {type(q_solve).__name__}")
    if q_solve.shape != q.shape:
        raise InputError(f"q_solve must have q's shape {tuple(q.shape)}, got {tuple(q_solve.shape)}")
    if q_solve.dtype != q.dtype or q_solve.device != q.device:
        raise InputError(f"q_solve must match q's dtype and device ({q.dtype}, {q.device}); "
                         f"got {q_solve.dtype}, {q_solve.device}")
    if q_solve.stride(-1) != 1:
        raise InputError(f"q_solve must be contiguous in its last dim, got strides {q_solve.stride()}")


def _check_cu_seqlens(q, cu_seqlens, max_seqlen=None):
    """(cu_seqlens as int32, longest length) after checking it against q. With max_seqlen
    given, the offsets are trusted and nothing waits for the device (CUDA graphs)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise InputError("cu_seqlens must be a 1-D tensor [N+1] of sequence start offsets")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise InputError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise InputError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if q.shape[0] != 1:
        raise InputError(f"with cu_seqlens, q, k, v must be [1, total_T, H, D] (packed); got B={q.shape[0]}")
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise InputError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
        if DEBUG:  # one host sync; without it bad offsets give wrong rows (clamped, in bounds)
            _check_offsets(cu_seqlens.tolist(), q.shape[1], max_seqlen)
        return cu_seqlens.to(torch.int32).contiguous(), max_seqlen
    bounds = cu_seqlens.tolist()  # one host sync, as the longest length sizes the launch
    return cu_seqlens.to(torch.int32).contiguous(), max(_check_offsets(bounds, q.shape[1]), 1)


def _check_offsets(bounds, total, max_seqlen=None) -> int:
    """The longest length of offsets `bounds`, after checking them against q's total_T
    and max_seqlen (if given); InputError naming cu_seqlens or max_seqlen otherwise."""
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths) < 0:
        raise InputError(f"cu_seqlens must rise from 0 to total_T={total}, got {bounds}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        raise InputError(f"max_seqlen={max_seqlen} is below the longest sequence of cu_seqlens "
                         f"({max(lengths)}); the kernels would skip its rows past max_seqlen")
    return max(lengths)


def _unpadded(attention_mask, q, k, v, beta, q_solve, config, large_beta):
    """Padding masks by packing: the unpadded tokens of each row become one sequence
    (cu_seqlens), so padded positions reach no other position, in the solve stage too;
    the output is zero at padded positions."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != q.shape[:2]:
        shape = getattr(attention_mask, "shape", None)
        raise InputError(f"attention_mask must be a [B, T] = {tuple(q.shape[:2])} tensor of 0/1 "
                         f"(0 = padding), got {tuple(shape) if shape is not None else type(attention_mask).__name__}")
    if attention_mask.device != q.device:
        raise InputError(f"attention_mask is on {attention_mask.device} but q is on {q.device}")
    keep = attention_mask.bool()
    if attention_mask.dtype != torch.bool and not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    B, T, H, D = q.shape
    index = keep.flatten().nonzero().squeeze(1)
    if index.numel() == 0:  # all padding: a zero output, still differentiable (zero grads)
        inputs = (q, k, v, beta, q_solve)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            return _AllPadding.apply(*inputs)
        return q.new_zeros(B, T, H, D)
    out = q.new_zeros(B * T, H, D)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu[1:] = keep.sum(1).cumsum(0)

    def pack(t):
        return None if t is None else t.reshape(B * T, *t.shape[2:]).index_select(0, index).unsqueeze(0)

    o = deltaformer_attn(pack(q), pack(k), pack(v), pack(beta), q_solve=pack(q_solve),
                         cu_seqlens=cu, config=config, large_beta=large_beta)
    return out.index_copy(0, index, o[0]).view(B, T, H, D)


def deltaformer_attn(q, k, v, beta=None, *, q_solve=None, cu_seqlens=None, max_seqlen=None,
                     attention_mask=None, config: KernelConfig | dict | None = None,
                     large_beta: bool = False):
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
        host and raises InputError.
    attention_mask: [B, T] of 0/1 (0 = padding, left or right), as in Hugging Face models:
        padded positions influence nothing and get a zero output.
    config: a KernelConfig or its dict form (missing sections come from the built-in
        default); None picks the tuned config for this GPU and shape (dfgen.dispatch).
    large_beta: True when some |beta| may exceed 2 (a raw, un-squashed projection): the
        solve stages then build their in-chunk inverse from float32 products (tf32x3;
        slower). The default 16-bit configs build it from float16 products, right for
        |beta| <= 2 (sigmoid and 2 * sigmoid models) and not past it (the products cancel;
        NaN near beta = 8). DFGEN_DEBUG=1 checks |beta| <= 2 when large_beta is False.
    Returns o, [B, T, H, D], in q's dtype; differentiable in q, k, v, beta and q_solve.
    """
    _check_inputs(q, k, v, beta)
    compiling = torch.compiler.is_compiling()  # asked once: this is every call's path
    if large_beta is not False:
        if large_beta is not True:
            raise InputError(f"large_beta must be True or False, got {large_beta!r}")
        if compiling:
            raise InputError("large_beta=True is not supported under torch.compile yet; pass a "
                             "config whose solve and solve_bwd sections set INV_FP16: false")
    elif DEBUG and beta is not None and not compiling:
        _check_beta_range(beta)
    if attention_mask is not None:
        if cu_seqlens is not None:
            raise InputError("give attention_mask or cu_seqlens, not both")
        if compiling:
            raise InputError("attention_mask is not supported under torch.compile yet")
        return _unpadded(attention_mask, q, k, v, beta, q_solve, config, large_beta)
    B, T, H, D = q.shape
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, beta, q_solve))
    seqs = None
    if cu_seqlens is not None:
        if compiling:
            raise InputError("cu_seqlens is not supported under torch.compile yet")
        seqs = _check_cu_seqlens(q, cu_seqlens, max_seqlen)
    if q_solve is not None:
        _check_q_solve(q, q_solve)
        if compiling:
            raise InputError("q_solve is not supported under torch.compile yet")
        config = _two_stage(resolve_config(config, q, needs_grad, seqs, variant="qsolve",
                                           large_beta=large_beta), D, q.dtype).check(D, needs_grad)
        if needs_grad:
            return _DeltaFormerAttnQSolve.apply(q, q_solve, k, v, beta, config, seqs)
        return forward_q_solve(q, q_solve, k, v, beta, config, seqs=seqs)[0]
    if compiling:
        # Traced as custom ops (no graph break); the config travels as a JSON constant and
        # is resolved inside the op, where tuned files may be read.
        if isinstance(config, dict):
            raise InputError("under torch.compile pass config as a KernelConfig (or None)")
        if config is not None and not isinstance(config, KernelConfig):
            raise ConfigError(_CONFIG_TYPE.format(type(config).__name__))
        text = config.json if config is not None else ""
        if needs_grad:
            return torch.ops.dfgen.attn_fwd_train(q, k, v, beta, text)[0]
        return torch.ops.dfgen.attn_fwd(q, k, v, beta, text)
    return _eager(q, k, v, beta, config, needs_grad, seqs, large_beta)


def _check_beta_range(beta):
    """DFGEN_DEBUG: |beta| <= 2 unless the call says large_beta (one host sync)."""
    largest = beta.detach().abs().max().item() if beta.numel() else 0.0
    if not largest <= 2.0:  # NaN fails too
        raise InputError(f"beta reaches |beta| = {largest:g} > 2, where the default 16-bit "
                         "in-chunk inverse is not accurate: pass large_beta=True (or squash beta, "
                         "e.g. with a sigmoid)")


_float32_solves: dict = {}


def _with_float32_solve(config: KernelConfig) -> KernelConfig:
    """`config` with the solve stages' in-chunk inverse and products at float32 accuracy
    (large_beta; memoized, as the runtime asks on every call)."""
    found = _float32_solves.get(config.key())
    if found is None:
        precise = {knob: values[0] for knob, values in FLOAT32_ACCURATE.items()}
        found = KernelConfig(config.strategy, dict(config.solve, **precise), config.attn,
                             dict(config.solve_bwd, **precise), config.attn_bwd)
        _float32_solves[config.key()] = found
    return found


def resolve_config(config, q, needs_grad: bool, seqs=None, variant: str = "",
                   large_beta: bool = False) -> KernelConfig:
    """The validated config for a call: the given one (missing sections from the built-in
    default), or the tuned one for this GPU and shape (packed sequences count as their
    longest length and number); with large_beta, its solves at float32 accuracy."""
    B, T, H, D = q.shape
    if seqs is not None:
        B, T = seqs[0].numel() - 1, seqs[1]
    if config is None:
        config = dispatcher_for(q.device).choose(
            "fwd+bwd" if needs_grad else "fwd", _DTYPE_NAMES[q.dtype], D, T, B * H, variant).config
    elif isinstance(config, dict):
        config = KernelConfig.from_dict(config, defaults=default_config(D, q.dtype))
    elif isinstance(config, KernelConfig):
        config = config.with_defaults(default_config(D, q.dtype))
    else:
        raise ConfigError(_CONFIG_TYPE.format(type(config).__name__))
    if large_beta:
        config = _with_float32_solve(config)
    return config.check(D, backward=needs_grad)


def _eager(q, k, v, beta, config, needs_grad, seqs=None, large_beta=False):
    config = resolve_config(config, q, needs_grad, seqs, large_beta=large_beta)
    if needs_grad:
        return _DeltaFormerAttn.apply(q, k, v, beta, config, seqs)
    return forward(q, k, v, beta, config, seqs=seqs)[0]
