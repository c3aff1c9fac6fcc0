"""The backward: each stage alone against the math note's formulas, and every gradient of
deltaformer_attn against autograd of the reference."""

import pytest
import torch

from conftest import DEVICE, DTYPES, ON_GPU, assert_close, gpu_only, make_inputs, rel_err
from dfgen.kernels.backward import query_key_grads, reverse_sweep
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.kernels.forward import forward, inverse_buffer, kept_inverses, keeps_inverse, solve_stage
from dfgen.reference import (naive_backward_terms, naive_deltaformer_attn, naive_deltaformer_u,
                         naive_strict_lse)
from dfgen.runtime import deltaformer_attn

# bounds on the relative error of gradients, by input dtype
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
REF = torch.float32 if ON_GPU else torch.float64


def sweep_knobs(C, M, fp16_inverse=False, precision="tf32x3"):
    return dict(CHUNK=C, BLOCK_M=M, INV_FP16=fp16_inverse, SOLVE_PRECISION=precision,
                num_warps=4, num_stages=2)


def qk_knobs(M, N):
    return dict(BLOCK_M=M, BLOCK_N=N, num_warps=4, num_stages=2)


def fwd_knobs(C=16):
    return dict(default_config(32, torch.float32).solve, CHUNK=C, BLOCK_N=16 if C <= 32 else 32,
                LOOKAHEAD=1)


# (B, T, H, D, sweep knobs, dq/dk knobs): chunks and blocks that do not divide T, T = 1
STAGE_CASES = [
    (1, 1, 1, 32, sweep_knobs(16, 16), qk_knobs(16, 16)),
    (2, 45, 2, 32, sweep_knobs(16, 16), qk_knobs(16, 32)),
    (1, 70, 1, 64, sweep_knobs(32, 16, fp16_inverse=True), qk_knobs(32, 16)),
    (1, 83, 2, 32, sweep_knobs(64, 32), qk_knobs(64, 64)),
]


def _stage_id(c):
    return f"B{c[0]}-T{c[1]}-H{c[2]}-D{c[3]}-C{c[4]['CHUNK']}-M{c[4]['BLOCK_M']}-qk{c[5]['BLOCK_M']}x{c[5]['BLOCK_N']}"


def _tol(dtype, knobs=None):
    if dtype == torch.float32 and knobs is not None and (knobs["INV_FP16"] or knobs["SOLVE_PRECISION"] == "tf32"):
        return 3e-3
    return GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", STAGE_CASES, ids=_stage_id)
def test_reverse_sweep_alone(case, dtype_name):
    """The sweep building its in-chunk inverses, and reading those the forward kept."""
    B, T, H, D, knobs, _ = case
    dtype = DTYPES[dtype_name]
    q, k, v, beta = make_inputs(B, T, H, D, dtype, seed=T)
    do = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    kept = keeps_inverse(dtype, D, knobs["CHUNK"])
    inv = inverse_buffer(q, knobs["CHUNK"]) if kept else None
    u, _, lse, a = solve_stage(q, k, v, beta, fwd_knobs(knobs["CHUNK"]), write_o=False, write_a=True,
                               inv=inv)
    ref = naive_backward_terms(q, k, v, beta, do, REF)
    tol = _tol(dtype, knobs)
    for kept in (None, inv) if inv is not None else (None,):
        dv, e, dbeta, delta, ds_diag = reverse_sweep(q, k, do, u, a, beta, lse, knobs, inv=kept)
        # the reference from the kernel's own u and a isolates this stage's error
        assert_close(dv, ref["dv"], dtype, "dv", tol)
        assert_close(e, ref["e"], dtype, "e", tol)
        if T > 1:
            assert_close(dbeta, ref["dbeta"], dtype, "dbeta", tol)
            assert_close(delta, ref["delta"], dtype, "delta", tol)
            assert_close(ds_diag, ref["ds_diag"], dtype, "ds_diag", tol)


def test_the_reverse_sweep_reads_the_kept_inverses_only_under_its_chunk():
    """The forward's in-chunk inverses are what the sweep reads (spoiled ones spoil dv),
    and only where they were built under the sweep's CHUNK (else it builds its own)."""
    q, k, v, beta = make_inputs(2, 45, 2, 32, torch.float32, seed=3)
    do = torch.randn(2, 45, 2, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    inv = inverse_buffer(q, 16)
    assert inv.shape == (4, 3, 16, 16) and inv.dtype == torch.float32
    assert inverse_buffer(q.to(torch.bfloat16), 16).dtype == torch.float16
    u, _, lse, a = solve_stage(q, k, v, beta, fwd_knobs(16), write_o=False, write_a=True, inv=inv)
    built = reverse_sweep(q, k, do, u, a, beta, lse, sweep_knobs(16, 16))[0]
    spoiled = torch.zeros_like(inv)
    assert rel_err(reverse_sweep(q, k, do, u, a, beta, lse, sweep_knobs(16, 16), inv=spoiled)[0],
                   built) > 0.5
    other = reverse_sweep(q, k, do, u, a, beta, lse, sweep_knobs(32, 16), inv=spoiled)[0]
    assert rel_err(other, reverse_sweep(q, k, do, u, a, beta, lse, sweep_knobs(32, 16))[0]) == 0


def test_no_inverse_is_kept_where_its_store_is_miscompiled():
    """16-bit inputs on head-dim-32 kernels with chunks of 64 rows: the forward's store of
    the inverses ends in an illegal memory access on the H200 (Triton 3.6), so a training
    forward keeps none there (the sweep builds its own) and solve_stage refuses to."""
    for dtype in (torch.float16, torch.bfloat16):
        assert not keeps_inverse(dtype, 32, 64) and not keeps_inverse(dtype, 16, 64)
        assert not keeps_inverse(dtype, 32, 128)
        assert keeps_inverse(dtype, 32, 32) and keeps_inverse(dtype, 64, 64) and keeps_inverse(dtype, 128, 64)
    assert keeps_inverse(torch.float32, 32, 64) and keeps_inverse(torch.float32, 16, 64)
    q, k, v, beta = make_inputs(1, 20, 1, 32, torch.bfloat16, seed=5)
    config = default_config(32, torch.bfloat16)
    assert config.solve["CHUNK"] == 64
    assert forward(q, k, v, beta, config, for_backward=True)[4] is None
    assert kept_inverses(q, 64) is None and kept_inverses(q, 32) is not None
    with pytest.raises(ValueError, match="keeps_inverse"):
        solve_stage(q, k, v, beta, config.solve, write_o=False, write_a=True, inv=inverse_buffer(q, 64))
    q32, k32, v32, beta32 = make_inputs(1, 20, 1, 32, torch.float32, seed=5)
    assert forward(q32, k32, v32, beta32, default_config(32, torch.float32), for_backward=True)[4] is not None


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("B,T,H,H_kv,D,block", [(1, 1, 1, 1, 32, 16), (2, 45, 2, 1, 32, 16),
                                               (1, 70, 2, 2, 64, 32), (1, 83, 1, 1, 32, 64)])
def test_one_launch_gives_what_two_launches_give(B, T, H, H_kv, D, block, dtype_name):
    """ONE_LAUNCH (program j: key block j's dk, then row block j's dq) computes each block
    as the two launches do: equal dq, dk and du, grouped heads, packed sequences, blocks of
    two sizes and T not a multiple of the block included."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(T)
    q, u, e = (torch.randn(B, T, H, D, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    k = torch.randn(B, T, H_kv, D, generator=gen).to(dtype).to(DEVICE)
    lse = (torch.randn(B, H, T, generator=gen) + 3.0).to(DEVICE)
    delta, ds_diag = (torch.randn(B, H, T, generator=gen).to(DEVICE) for _ in range(2))
    two = query_key_grads(q, k, u, e, lse, delta, ds_diag, qk_knobs(block, block), with_du=True)
    one = query_key_grads(q, k, u, e, lse, delta, ds_diag, dict(qk_knobs(block, block), ONE_LAUNCH=True),
                          with_du=True)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    if B == 2:  # packed sequences of 10 and 80 tokens (block T is the longest's)
        cu = torch.tensor([0, 10, 90], dtype=torch.int32, device=DEVICE)
        packed = [torch.randn(1, 90, n, D, generator=gen).to(dtype).to(DEVICE) for n in (H, H_kv, H, H)]
        rows = [(torch.randn(H, 90, generator=gen) + (3.0 if i == 0 else 0.0)).to(DEVICE) for i in range(3)]
        args = (packed[0], packed[1], packed[2], packed[3], *rows)
        two = query_key_grads(*args, qk_knobs(block, block), seqs=(cu, 80))
        one = query_key_grads(*args, dict(qk_knobs(block, block), ONE_LAUNCH=True), seqs=(cu, 80))
        assert all(torch.equal(a, b) for a, b in zip(one, two))
    # blocks of two sizes: the grid covers the more numerous ones
    two = query_key_grads(q, k, u, e, lse, delta, ds_diag, qk_knobs(16, 32), with_du=True)
    one = query_key_grads(q, k, u, e, lse, delta, ds_diag, dict(qk_knobs(16, 32), ONE_LAUNCH=True),
                          with_du=True)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", STAGE_CASES, ids=_stage_id)
def test_query_key_grads_alone(case, dtype_name):
    """dq and dk from reference e, delta and ds_ii against autograd of the reference."""
    B, T, H, D, _, knobs = case
    dtype = DTYPES[dtype_name]
    q, k, v, beta = make_inputs(B, T, H, D, dtype, seed=T + 1)
    do = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    ref = naive_backward_terms(q, k, v, beta, do, REF)
    u = naive_deltaformer_u(q, k, v, beta, REF).to(dtype)
    lse = naive_strict_lse(q, k, REF).float()
    dq, dk = query_key_grads(q, k, u, ref["e"].to(dtype), lse, ref["delta"].float(),
                             ref["ds_diag"].float(), knobs)
    qr, kr, vr = (t.detach().to(REF).requires_grad_() for t in (q, k, v))
    o = naive_deltaformer_attn(qr, kr, vr, beta, REF)
    dq_ref, dk_ref = torch.autograd.grad(o, (qr, kr), do.to(REF))
    if T == 1:
        assert dq.abs().max() == 0 and dk.abs().max() == 0
        return
    assert_close(dq, dq_ref, dtype, "dq", GRAD_TOL[dtype])
    assert_close(dk, dk_ref, dtype, "dk", GRAD_TOL[dtype])


SOLVE_A = dict(default_config(32, torch.float32).solve, CHUNK=16, BLOCK_N=16, LOOKAHEAD=2)
BWD_A = dict(solve_bwd=sweep_knobs(16, 16), attn_bwd=qk_knobs(16, 32))
CONFIGS = {
    "fused": KernelConfig("fused", SOLVE_A, **BWD_A),
    "two_stage": KernelConfig("two_stage", SOLVE_A, dict(BLOCK_M=32, BLOCK_N=16, num_warps=4,
                                                        num_stages=2), **BWD_A),
    "fused-C32": KernelConfig("fused", dict(SOLVE_A, CHUNK=32, LOOKAHEAD=1),
                              solve_bwd=sweep_knobs(32, 32, fp16_inverse=True, precision="tf32"),
                              attn_bwd=qk_knobs(32, 16)),
    "fused-one-launch": KernelConfig("fused", SOLVE_A, solve_bwd=sweep_knobs(16, 16),
                                     attn_bwd=dict(qk_knobs(32, 32), ONE_LAUNCH=True)),
}
CPU_GRAD_CASES = [((2, 45, 2, 32), "rand"), ((1, 70, 1, 32), None), ((1, 50, 2, 64), 1.5),
                  ((1, 1, 1, 32), "rand")]
GPU_GRAD_CASES = [((2, 8192, 2, 128), "rand"), ((4, 2048, 4, 64), "rand"), ((1, 3001, 3, 128), None)]


def _grad_params():
    out = []
    for shape, beta in CPU_GRAD_CASES:
        for dt in ("fp32", "fp16", "bf16"):
            for name in CONFIGS:
                out.append(pytest.param(shape, beta, dt, name,
                                        id=f"B{shape[0]}-T{shape[1]}-H{shape[2]}-D{shape[3]}-beta{beta}-{name}-{dt}"))
    for shape, beta in GPU_GRAD_CASES:
        for dt in ("fp16", "bf16"):
            for name in ("default", "default-one-launch"):
                out.append(pytest.param(shape, beta, dt, name, marks=gpu_only,
                                        id=f"B{shape[0]}-T{shape[1]}-H{shape[2]}-D{shape[3]}-beta{beta}-{name}-{dt}"))
    return out


@pytest.mark.parametrize("shape,beta_kind,dtype_name,config_name", _grad_params())
def test_gradients_match_reference(shape, beta_kind, dtype_name, config_name):
    dtype = DTYPES[dtype_name]
    q, k, v, beta = make_inputs(*shape, dtype, beta=beta_kind, seed=sum(shape))
    config = CONFIGS.get(config_name)  # None: the built-in default
    if config_name == "default-one-launch":  # the default's 64 x 64 blocks in one launch
        default = default_config(shape[3], dtype)
        config = KernelConfig(default.strategy, default.solve, solve_bwd=default.solve_bwd,
                              attn_bwd=dict(default.attn_bwd, ONE_LAUNCH=True))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if beta is not None:
        leaves.append(beta.requires_grad_())
    o = deltaformer_attn(q, k, v, beta, config=config)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [t.detach().to(REF).requires_grad_() for t in leaves]
    ref_beta = ref_leaves[3] if beta is not None else None
    ref_o = naive_deltaformer_attn(*ref_leaves[:3], ref_beta, REF)
    ref_grads = torch.autograd.grad(ref_o, ref_leaves, do.to(REF))
    tol = _tol(dtype, (config or default_config(shape[3], dtype)).solve_bwd)
    for name, got, want in zip(("dq", "dk", "dv", "dbeta"), grads, ref_grads):
        assert got.shape == want.shape, name
        if want.abs().max() == 0:  # T = 1: nothing before row 0
            assert got.abs().max() == 0, name
        else:
            assert_close(got, want, dtype, name, tol)


def test_beta_none_gives_no_beta_gradient():
    q, k, v, _ = make_inputs(1, 20, 1, 32, torch.float32, seed=3)
    q.requires_grad_()
    o = deltaformer_attn(q, k, v, None, config=CONFIGS["fused"])
    (dq,) = torch.autograd.grad(o.sum(), (q,))
    assert dq.shape == q.shape and torch.isfinite(dq).all()


def test_strided_gradient_output():
    """A do that is not contiguous (a transposed view) still works."""
    q, k, v, beta = make_inputs(1, 33, 2, 32, torch.float32, seed=4)
    v.requires_grad_()
    o = deltaformer_attn(q, k, v, beta, config=CONFIGS["fused"])
    do = torch.randn(1, 2, 33, 32, generator=torch.Generator().manual_seed(6))
    do = do.to(DEVICE).transpose(1, 2)  # non-contiguous, unit last stride
    (dv,) = torch.autograd.grad(o, (v,), do)
    vr = v.detach().double().requires_grad_()
    (dv_ref,) = torch.autograd.grad(naive_deltaformer_attn(q, k, vr, beta), (vr,), do.double())
    assert rel_err(dv, dv_ref) < 1e-4
