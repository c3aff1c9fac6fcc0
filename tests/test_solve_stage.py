"""The solve stage alone: u and the strict lse against the reference, and the fused o."""

import pytest
import torch

from conftest import DEVICE, DTYPES, ON_GPU, assert_close, gpu_only, make_inputs, rel_err, tolerance
from dfgen.kernels.forward import solve_stage
from dfgen.reference import (naive_deltaformer_attn, naive_deltaformer_u, naive_strict_attention,
                         naive_strict_lse)


def solve(C, N, L=1, fp16_inverse=False, precision="tf32x3", warps=4, stages=2, maxnreg=None,
          split_prefix=None, poll=None, split_at=None):
    knobs = dict(CHUNK=C, BLOCK_N=N, LOOKAHEAD=L, INV_FP16=fp16_inverse,
                 SOLVE_PRECISION=precision, num_warps=warps, num_stages=stages)
    # left out when None: the knobs' defaults fill them
    if maxnreg is not None:
        knobs["maxnreg"] = maxnreg
    if split_prefix is not None:
        knobs["SPLIT_PREFIX"] = split_prefix
    if poll is not None:
        knobs["POLL"] = poll
    if split_at is not None:
        knobs["SPLIT_AT"] = split_at
    return knobs


# (B, T, H, D, solve knobs): chunk and key blocks that do not divide T, T = 1, T < C,
# several chunks so the prefix loop and the tail both run.
CPU_CASES = [
    (1, 1, 1, 32, solve(16, 16)),
    (2, 45, 2, 32, solve(16, 16)),
    (1, 70, 1, 32, solve(32, 16, L=2, fp16_inverse=True)),
    (1, 83, 2, 64, solve(16, 16, L=3)),
    (2, 77, 1, 32, solve(32, 32, L=2, precision="tf32")),
    (1, 20, 1, 64, solve(64, 32)),
    # key blocks of two chunks: odd and even prefix lengths, so some blocks are half masked
    (1, 70, 1, 32, solve(16, 32)),
    (2, 83, 2, 32, solve(16, 32, L=2, fp16_inverse=True)),
    # the solve's products in 16-bit types, and a register cap (a launch option; the
    # interpreter ignores it, the GPU cases run it)
    (1, 70, 2, 32, solve(16, 16, L=2, fp16_inverse=True, precision="fp16", maxnreg=168)),
    (2, 50, 1, 32, solve(16, 16, L=3, fp16_inverse=True, precision="bf16")),
    # prefix-split programs take the first part of the prefix (chunks 4 on): even and odd
    # chunk counts (an odd count leaves the last step's second prefix-split program without
    # a chunk), every lookahead, key blocks of one and of two chunks
    (1, 150, 2, 32, solve(16, 16, L=2, split_prefix=True)),
    (2, 130, 1, 32, solve(16, 32, L=1, fp16_inverse=True, precision="fp16", split_prefix=True)),
    (1, 100, 2, 64, solve(16, 16, L=3, split_prefix=True)),
    # larger shares of the prefix to the prefix-split programs (one or two of them per step,
    # handed out later in the wavefront)
    (2, 170, 2, 32, solve(16, 16, L=2, split_prefix=True, split_at=75)),
    (1, 145, 3, 32, solve(16, 32, L=1, fp16_inverse=True, precision="fp16", split_prefix=True, split_at=67)),
    (1, 120, 2, 64, solve(16, 16, L=3, split_prefix=True, split_at=75)),
    (1, 200, 2, 32, solve(16, 16, L=2, split_prefix=True, split_at=88)),
    # relaxed polls with one fence per wait (NVIDIA only: the interpreter's waits are portable)
    (1, 90, 2, 32, solve(16, 16, L=2, split_prefix=True, poll="relaxed")),
]
GPU_CASES = [
    (2, 1000, 3, 64, solve(64, 64, precision="tf32")),
    (1, 4097, 2, 128, solve(64, 64, L=2, fp16_inverse=True, precision="tf32")),
    (1, 8192, 2, 128, solve(32, 32, L=3, fp16_inverse=True, precision="tf32")),
    (2, 2049, 2, 64, solve(128, 64, fp16_inverse=True, precision="tf32", warps=8)),
    (2, 3001, 4, 64, solve(64, 128, L=2, fp16_inverse=True, precision="tf32", stages=3)),
    (2, 2500, 3, 64, solve(64, 64, L=1, fp16_inverse=True, precision="fp16", stages=4, maxnreg=168)),
    (1, 4100, 2, 128, solve(64, 64, L=2, fp16_inverse=True, precision="bf16", maxnreg=168)),
    (2, 4000, 2, 64, solve(64, 128, L=2, fp16_inverse=True, precision="fp16", maxnreg=128)),
    (1, 4097, 3, 128, solve(64, 64, L=2, fp16_inverse=True, precision="fp16", split_prefix=True)),
    (2, 3001, 4, 64, solve(64, 128, L=1, fp16_inverse=True, precision="fp16", stages=3, split_prefix=True)),
    (1, 8192, 2, 128, solve(32, 32, L=3, fp16_inverse=True, precision="tf32", split_prefix=True)),
    (1, 4097, 3, 128, solve(64, 64, L=2, fp16_inverse=True, precision="tf32", split_prefix=True, split_at=75)),
    (2, 3001, 4, 64, solve(64, 128, L=1, fp16_inverse=True, precision="fp16", stages=3, split_prefix=True, split_at=67)),
    (1, 16384, 2, 128, solve(64, 64, L=2, fp16_inverse=True, precision="tf32", split_prefix=True, split_at=75)),
    (4, 1024, 32, 64, solve(64, 64, L=1, fp16_inverse=True, precision="fp16", stages=4, maxnreg=168, poll="relaxed")),
    (2, 3001, 3, 64, solve(64, 128, L=2, fp16_inverse=True, precision="fp16", split_prefix=True, poll="relaxed")),
    (1, 8192, 2, 128, solve(32, 32, L=3, fp16_inverse=True, precision="tf32", poll="relaxed")),
]


def case_id(case, dtype):
    B, T, H, D, k = case
    extra = "".join(f"-{v}" for v in (k["SOLVE_PRECISION"],) if v in ("fp16", "bf16"))
    extra += f"-r{k['maxnreg']}" if k.get("maxnreg") else ""
    extra += "-split-prefix" if k.get("SPLIT_PREFIX") else ""
    extra += f"-at{k['SPLIT_AT']}" if k.get("SPLIT_AT") else ""
    extra += f"-{k['POLL']}" if k.get("POLL") else ""
    return f"B{B}-T{T}-H{H}-D{D}-C{k['CHUNK']}-N{k['BLOCK_N']}-L{k['LOOKAHEAD']}{extra}-{dtype}"


def _params(cases, dtypes, marks=()):
    return [pytest.param(c, dt, id=case_id(c, dt), marks=marks) for c in cases for dt in dtypes]


ALL = _params(CPU_CASES, ["fp32", "fp16", "bf16"]) + _params(GPU_CASES, ["fp16", "bf16"], gpu_only)


@pytest.mark.parametrize("case,dtype_name", ALL)
def test_solve_stage_matches_reference(case, dtype_name):
    B, T, H, D, knobs = case
    dtype = DTYPES[dtype_name]
    q, k, v, beta = make_inputs(B, T, H, D, dtype, seed=T)
    ref_dtype = torch.float32 if ON_GPU else torch.float64
    u, o, lse, a = solve_stage(q, k, v, beta, knobs, write_o=True, write_a=True)
    tol = tolerance(dtype, knobs)
    u_ref = naive_deltaformer_u(q, k, v, beta, ref_dtype)
    assert_close(u, u_ref, dtype, "u", tol)
    if T > 1:
        assert_close(a, naive_strict_attention(q, k, u_ref, ref_dtype), dtype, "a", tol)
    assert (a[:, 0] == 0).all(), "row 0 has no earlier keys: a_0 = 0"
    assert_close(o, naive_deltaformer_attn(q, k, v, beta, ref_dtype), dtype, "o", tol)
    ref_lse = naive_strict_lse(q, k, ref_dtype)
    assert torch.isneginf(lse[:, :, 0]).all(), "row 0 has no keys: its lse must be -inf"
    if T > 1:
        assert rel_err(lse[:, :, 1:], ref_lse[:, :, 1:]) < 1e-5


@pytest.mark.parametrize("beta", [None, 1.5], ids=["beta-none", "beta-1.5"])
def test_solve_stage_beta_variants(beta):
    q, k, v, b = make_inputs(1, 50, 2, 32, torch.float32, beta=beta, seed=3)
    knobs = solve(16, 16, L=2)
    u, o, _, _ = solve_stage(q, k, v, b, knobs, write_o=True)
    assert_close(u, naive_deltaformer_u(q, k, v, b), torch.float32, "u")
    assert_close(o, naive_deltaformer_attn(q, k, v, b), torch.float32, "o")


def test_beta_above_one_grows_with_chunk():
    """With beta > 1 the solve is no longer a contraction and u can grow (like beta^C at
    worst). At beta = 3 the solution is larger than v but finite at this size, and the
    kernel must still match it."""
    q, k, v, b = make_inputs(1, 40, 1, 32, torch.float32, beta=3.0, seed=4)
    ref = naive_deltaformer_u(q, k, v, b)
    assert ref.abs().max() > 1.5 * v.abs().max(), "beta = 3 should amplify u"
    u, _, _, _ = solve_stage(q, k, v, b, solve(32, 16), write_o=False)
    assert rel_err(u, ref) < 1e-4


def test_a_without_o():
    """The two-stage strategy's solve writes a (for the backward) without o."""
    q, k, v, b = make_inputs(1, 45, 2, 32, torch.float32, seed=7)
    u, o, _, a = solve_stage(q, k, v, b, solve(16, 16, L=2), write_o=False,
                             write_a=True)
    assert o is None
    assert_close(a, naive_strict_attention(q, k, naive_deltaformer_u(q, k, v, b)),
                 torch.float32, "a")


def test_write_o_false_leaves_o_alone():
    q, k, v, b = make_inputs(1, 20, 1, 32, torch.float16, seed=5)
    u, o, lse, a = solve_stage(q, k, v, b, solve(16, 16), write_o=False)
    assert o is None and a is None
    assert_close(u, naive_deltaformer_u(q, k, v, b), torch.float16, "u")


def test_strided_inputs():
    """q, k, v as views into one packed [B, T, 3, H, D] tensor (strides, not copies)."""
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 37, 3, 2, 32, generator=gen).to(DEVICE)
    q, k, v = qkv.unbind(2)
    beta = torch.rand(2, 2, 37, generator=gen).to(DEVICE).transpose(1, 2)  # strided beta
    u, o, _, _ = solve_stage(q, k, v, beta, solve(16, 16), write_o=True)
    assert_close(o, naive_deltaformer_attn(q, k, v, beta), torch.float32, "o")
