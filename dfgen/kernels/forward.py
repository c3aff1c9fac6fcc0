"""Host side of the forward pass: allocate, then launch the generated stages.

Inputs are assumed validated (dfgen.api.inputs does that); tensors are [B, T, H, D] with a
unit stride on D, any other strides.
"""

from __future__ import annotations

import math

import torch

from . import build
from .flags import zeroed_flags
from .config import KernelConfig
from .padding import kernel_head_dim, narrow, packing, widen


def softmax_scale(head_dim: int, scale=None) -> float:
    """The scores' scale: `scale` when given, else 1/sqrt(head_dim) (the real head dim,
    also where the kernels are built for a wider one)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def solve_stage(q, k, v, beta, knobs, *, write_o: bool, write_a: bool = False, seqs=None,
                inv=None, scale=None):
    """Run the solve stage alone. Returns (u, o or None, lse [B, H, T] float32, a or None),
    a_i = sum_{j<i} P_ij u_j being what the backward needs. seqs: None for a padded batch,
    or (cu_seqlens, longest length) for packed sequences in [1, total, H, D] tensors. inv:
    None, or inverse_buffer(...) under these knobs, which gets the in-chunk inverses.
    scale: the scores' scale (None: 1/sqrt(D))."""
    D = q.shape[3]
    if inv is not None and not keeps_inverse(q.dtype, D, knobs["CHUNK"]):
        raise ValueError(f"the in-chunk inverses cannot be kept at head dim {D} in {q.dtype} with "
                         f"CHUNK {knobs['CHUNK']} (keeps_inverse)")
    wide = kernel_head_dim(D, q.dtype)
    if wide != D:
        q, k, v = widen(q, wide), widen(k, wide), widen(v, wide)
    module = build.load("solve_fwd", q.dtype, wide, knobs)
    u, o, a, lse, sync = solve_buffers(q, module, write_o=write_o, write_a=write_a, seqs=seqs)
    module.launch(q, k, v, beta, u, o, a, lse, sync, softmax_scale(D, scale), *packing(seqs),
                  inv=inv)
    if wide != D:
        u, o, a = narrow(u, D), narrow(o, D), narrow(a, D)
    return u, o, lse, a


def keeps_inverse(dtype, head_dim: int, chunk: int) -> bool:
    """Whether a training forward keeps its in-chunk inverses for the reverse sweep: not for
    16-bit inputs served by head-dim-32 kernels with chunks of 64 rows or more. There Triton
    3.6 miscompiles the forward's store of them for Hopper: on the H200 the forward at CHUNK
    64 (BLOCK_N 32, a float32 inverse) ended in an illegal memory access in fp16 and bf16 in
    each of run 28's 24 cases, and ran right with the same knobs without the store; head dim
    64, 32-row chunks and float32 were right. The rule covers every such config, mapped or
    not; the reverse sweep builds its own inverse there."""
    return dtype == torch.float32 or kernel_head_dim(head_dim, dtype) >= 64 or chunk <= 32


def inverse_buffer(q, chunk: int, seqs=None):
    """Where a training forward keeps each chunk's in-chunk inverse for the reverse sweep
    ([sequences * H, chunks, chunk, chunk]; float16 for 16-bit inputs, as the forward's
    fp16 inverse products round it, float32 for float32 ones): T * chunk values per head."""
    B, T, H, _ = q.shape
    n_seqs, longest = (B, T) if seqs is None else (seqs[0].numel() - 1, seqs[1])
    dtype = torch.float32 if q.dtype == torch.float32 else torch.float16
    return torch.empty(n_seqs * H, -(-longest // chunk), chunk, chunk, dtype=dtype, device=q.device)


def kept_inverses(q, chunk: int, seqs=None):
    """The buffer a training forward keeps its in-chunk inverses in (inverse_buffer), or
    None where it keeps none (keeps_inverse): what every caller that keeps them asks."""
    return inverse_buffer(q, chunk, seqs) if keeps_inverse(q.dtype, q.shape[3], chunk) else None


def solve_buffers(q, module, *, write_o: bool, write_a: bool = False, seqs=None):
    """What one launch of the solve_fwd `module` writes: (u, o or None, a or None, lse
    [B, H, T] float32, sync: the ticket counter and the module's FLAGS_PER_CHUNK flags per
    chunk, zeroed)."""
    B, T, H, D = q.shape
    n_seqs, longest = (B, T) if seqs is None else (seqs[0].numel() - 1, seqs[1])
    u = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    o = torch.empty_like(u) if write_o else None
    a = torch.empty_like(u) if write_a else None
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    n_chunks = -(-longest // module.CHUNK_ROWS)
    n_flags = getattr(module, "FLAGS_PER_CHUNK", 1) * n_seqs * H * n_chunks  # (older modules: 1)
    sync = zeroed_flags(1 + n_flags, q.device)
    return u, o, a, lse, sync


def attention_stage(q, k, u, knobs, *, return_lse: bool = False, seqs=None, scale=None):
    """Causal attention of q over (k, u): o_i = sum_{j<=i} softmax(s_i)_j u_j; with
    return_lse also (o, lse_i = logsumexp_{j<=i} s_ij as [B, H, T] float32)."""
    B, T, H, D = q.shape
    wide = kernel_head_dim(D, q.dtype)
    if wide != D:
        q, k, u = widen(q, wide), widen(k, wide), widen(u, wide)
    module = build.load("attn_fwd", q.dtype, wide, knobs)
    o = torch.empty_like(u)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device) if return_lse else None
    module.launch(q, k, u, o, softmax_scale(D, scale), lse, *packing(seqs))
    if wide != D:
        o = narrow(o, D)
    return (o, lse) if return_lse else o


def forward(q, k, v, beta, config: KernelConfig, *, for_backward: bool = False, seqs=None,
            keep_inverse: bool = True, scale=None):
    """(o, u, lse, a, inv) under `config`'s strategy; a and inv (None unless for_backward;
    inv also None without keep_inverse) are sum_{j<i} P_ij u_j, which the backward needs
    besides u and lse, and the in-chunk inverses (inverse_buffer), which its reverse sweep
    reads instead of building them again where its CHUNK is the forward's."""
    fused = config.strategy == "fused"
    inv = kept_inverses(q, config.solve["CHUNK"], seqs) if for_backward and keep_inverse else None
    u, o, lse, a = solve_stage(q, k, v, beta, config.solve, write_o=fused, write_a=for_backward,
                               seqs=seqs, inv=inv, scale=scale)
    if not fused:
        o = attention_stage(q, k, u, config.attn, seqs=seqs, scale=scale)
    return o, u, lse, a, inv


def forward_q_solve(q, q_solve, k, v, beta, config: KernelConfig, *, for_backward: bool = False,
                    seqs=None, scale=None, return_lse: bool = False, keep_inverse: bool = True):
    """The two-stage pass with the solve stage's own queries: u from the strict softmax of
    q_solve k^T, then o = causal softmax(q k^T) u. Returns (o, u, lse_solve, a, lse_attn,
    inv), a and inv (forward's) being None unless for_backward, lse_attn (inclusive) None
    unless for_backward or return_lse."""
    inv = kept_inverses(q_solve, config.solve["CHUNK"], seqs) if for_backward and keep_inverse else None
    u, _, lse_solve, a = solve_stage(q_solve, k, v, beta, config.solve, write_o=False,
                                     write_a=for_backward, seqs=seqs, inv=inv, scale=scale)
    if for_backward or return_lse:
        o, lse_attn = attention_stage(q, k, u, config.attn, return_lse=True, seqs=seqs, scale=scale)
    else:
        o, lse_attn = attention_stage(q, k, u, config.attn, seqs=seqs, scale=scale), None
    return o, u, lse_solve, a, lse_attn, inv


def diagonal_scores(q, k, scale=None):
    """s_ii = scale * q_i . k_i as [B, T, H] float32 (k per query head: grouped heads share
    it)."""
    group = q.shape[2] // k.shape[2]
    k_q = k if group == 1 else k.repeat_interleave(group, dim=2)
    return (q.float() * k_q.float()).sum(-1) * softmax_scale(q.shape[3], scale)


def inclusive_lse(q, k, lse_strict, scale=None):
    """logsumexp_{j<=i} s_ij as [B, H, T] float32 (what attention APIs return as the lse),
    from the solve's strict lse_i = logsumexp_{j<i} s_ij and the diagonal score."""
    return torch.logaddexp(lse_strict, diagonal_scores(q, k, scale).transpose(1, 2))
