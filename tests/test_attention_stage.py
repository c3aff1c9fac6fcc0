"""The attention stage alone: causal softmax attention of q over (k, u)."""

import pytest
import torch

from conftest import DTYPES, ON_GPU, assert_close, gpu_only, make_inputs
from dfgen.kernels.forward import attention_stage
from dfgen.reference import naive_causal_attention


def attn(M, N, warps=4, stages=2):
    return dict(BLOCK_M=M, BLOCK_N=N, num_warps=warps, num_stages=stages)


CPU_CASES = [(1, 1, 1, 32, attn(32, 16)), (2, 45, 2, 32, attn(32, 16)),
             (1, 70, 1, 64, attn(64, 32)), (1, 33, 2, 64, attn(32, 32))]
GPU_CASES = [(2, 1000, 3, 64, attn(128, 64, 8, 3)), (1, 8192, 2, 128, attn(128, 64, 8, 3)),
             (1, 4097, 2, 128, attn(64, 32, 4, 2))]


def _params(cases, dtypes, marks=()):
    return [pytest.param(c, dt, marks=marks,
                         id=f"B{c[0]}-T{c[1]}-H{c[2]}-D{c[3]}-M{c[4]['BLOCK_M']}-N{c[4]['BLOCK_N']}-{dt}")
            for c in cases for dt in dtypes]


@pytest.mark.parametrize("case,dtype_name", _params(CPU_CASES, ["fp32", "fp16", "bf16"])
                         + _params(GPU_CASES, ["fp16", "bf16"], gpu_only))
def test_attention_stage_matches_reference(case, dtype_name):
    B, T, H, D, knobs = case
    dtype = DTYPES[dtype_name]
    q, k, u, _ = make_inputs(B, T, H, D, dtype, seed=T + 1)
    out = attention_stage(q, k, u, knobs)
    ref = naive_causal_attention(q, k, u, torch.float32 if ON_GPU else torch.float64)
    assert_close(out, ref, dtype, "o")
