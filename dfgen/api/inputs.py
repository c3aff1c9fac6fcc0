"""Checks of deltaformer_attn's arguments: each failure is an InputError naming the
argument and what was expected. Passing checks of CUDA inputs are remembered by what they
look at, so a training loop pays a set lookup per call."""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..kernels.config import SUPPORTED_HEAD_DIMS
from .. import settings
from ..settings import interpreter_active

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_VALID_SIGNATURES: set = set()  # inputs already checked, by what the checks look at


def _signature(q, k, v, beta):
    """What _check_inputs depends on, or None when it cannot be read cheaply."""
    try:
        return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
                v.device, q.stride(-1), k.stride(-1), v.stride(-1),
                None if beta is None else (beta.shape, beta.dtype, beta.device))
    except (AttributeError, TypeError, RuntimeError, IndexError):
        return None


def check_inputs(q, k, v, beta):
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


def check_q_solve(q, q_solve):
    if not isinstance(q_solve, torch.Tensor):
        raise InputError(f"q_solve must be a torch.Tensor or None, got {type(q_solve).__name__}")
    if q_solve.shape != q.shape:
        raise InputError(f"q_solve must have q's shape {tuple(q.shape)}, got {tuple(q_solve.shape)}")
    if q_solve.dtype != q.dtype or q_solve.device != q.device:
        raise InputError(f"q_solve must match q's dtype and device ({q.dtype}, {q.device}); "
                         f"got {q_solve.dtype}, {q_solve.device}")
    if q_solve.stride(-1) != 1:
        raise InputError(f"q_solve must be contiguous in its last dim, got strides {q_solve.stride()}")


def check_cu_seqlens(q, cu_seqlens, max_seqlen=None):
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
        if settings.DEBUG:  # one host sync; without it bad offsets give wrong rows (clamped, in bounds)
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


def check_beta_range(beta):
    """DFGEN_DEBUG: |beta| <= 2 unless the call says large_beta (one host sync)."""
    largest = beta.detach().abs().max().item() if beta.numel() else 0.0
    if not largest <= 2.0:  # NaN fails too
        raise InputError(f"beta reaches |beta| = {largest:g} > 2, where the default 16-bit "
                         "in-chunk inverse is not accurate: pass large_beta=True (or squash beta, "
                         "e.g. with a sigmoid)")


def check_attention_mask(attention_mask, q) -> torch.Tensor:
    """The [B, T] padding mask as bool (True = token); InputError unless it is a [B, T]
    tensor of 0/1 on q's device."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != q.shape[:2]:
        shape = getattr(attention_mask, "shape", None)
        raise InputError(f"attention_mask must be a [B, T] = {tuple(q.shape[:2])} tensor of 0/1 "
                         f"(0 = padding), got {tuple(shape) if shape is not None else type(attention_mask).__name__}")
    if attention_mask.device != q.device:
        raise InputError(f"attention_mask is on {attention_mask.device} but q is on {q.device}")
    if attention_mask.dtype != torch.bool and not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    return attention_mask.bool()


def check_large_beta(large_beta) -> None:
    check_flag("large_beta", large_beta)


def check_flag(name: str, value) -> None:
    if value is not True and value is not False:
        raise InputError(f"{name} must be True or False, got {value!r}")


def check_scale(scale) -> float:
    """The softmax scale as a float; InputError unless it is a finite real number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"scale must be a finite number (the softmax scale; None for "
                         f"1/sqrt(D)), got {scale!r}")
    return float(scale)
