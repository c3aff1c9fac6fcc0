"""End to end through dfgen.runtime.deltaformer_attn: both strategies, several configs."""

import pytest
import torch

from conftest import DTYPES, ON_GPU, assert_close, gpu_only, make_inputs, tolerance
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.reference import naive_deltaformer_attn
from dfgen.runtime import deltaformer_attn

SOLVE_A = dict(CHUNK=16, BLOCK_N=16, LOOKAHEAD=2, INV_FP16=False, SOLVE_PRECISION="tf32x3",
               num_warps=4, num_stages=2)
SOLVE_B = dict(CHUNK=32, BLOCK_N=16, LOOKAHEAD=1, INV_FP16=True, SOLVE_PRECISION="tf32",
               num_warps=4, num_stages=3)
ATTN = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)
CONFIGS = {
    "fused-A": KernelConfig("fused", SOLVE_A),
    "fused-B": KernelConfig("fused", SOLVE_B),
    "two_stage-A": KernelConfig("two_stage", SOLVE_A, ATTN),
}
CPU_SHAPES = [(1, 1, 1, 32), (2, 45, 2, 32), (1, 50, 1, 64)]
GPU_SHAPES = [(2, 8192, 2, 128), (4, 2048, 4, 64), (1, 3001, 3, 128)]


def _params():
    out = []
    for shape in CPU_SHAPES:
        for dt in ("fp32", "fp16", "bf16"):
            for name in CONFIGS:
                out.append(pytest.param(shape, dt, name, id=f"B{shape[0]}-T{shape[1]}-H{shape[2]}-D{shape[3]}-{name}-{dt}"))
    for shape in GPU_SHAPES:
        for dt in ("fp16", "bf16"):
            for strategy in ("fused", "two_stage"):
                out.append(pytest.param(shape, dt, "default-" + strategy, marks=gpu_only,
                                        id=f"B{shape[0]}-T{shape[1]}-H{shape[2]}-D{shape[3]}-default-{strategy}-{dt}"))
    return out


@pytest.mark.parametrize("shape,dtype_name,config_name", _params())
def test_deltaformer_attn_matches_reference(shape, dtype_name, config_name):
    dtype = DTYPES[dtype_name]
    q, k, v, beta = make_inputs(*shape, dtype, seed=sum(shape))
    if config_name.startswith("default-"):
        config = default_config(shape[3], dtype, strategy=config_name.split("-", 1)[1])
    else:
        config = CONFIGS[config_name]
    out = deltaformer_attn(q, k, v, beta, config=config)
    assert out.dtype == dtype and out.shape == q.shape
    ref = naive_deltaformer_attn(q, k, v, beta, torch.float32 if ON_GPU else torch.float64)
    assert_close(out, ref, dtype, "o", tolerance(dtype, config.solve))


def test_config_as_dict_and_beta_none():
    q, k, v, _ = make_inputs(1, 30, 2, 32, torch.float16, seed=9)
    out = deltaformer_attn(q, k, v, None, config=CONFIGS["fused-A"].to_dict())
    assert_close(out, naive_deltaformer_attn(q, k, v), torch.float16, "o")


def test_strategies_agree():
    q, k, v, beta = make_inputs(1, 40, 1, 32, torch.float32, seed=10)
    fused = deltaformer_attn(q, k, v, beta, config=CONFIGS["fused-A"])
    two = deltaformer_attn(q, k, v, beta, config=CONFIGS["two_stage-A"])
    assert torch.allclose(fused, two, atol=1e-4, rtol=1e-4)


def test_no_grad_inputs_that_require_grad_are_fine_under_no_grad():
    q, k, v, beta = make_inputs(1, 16, 1, 32, torch.float32, seed=11)
    q.requires_grad_(True)
    with torch.no_grad():
        out = deltaformer_attn(q, k, v, beta, config=CONFIGS["fused-A"])
    assert not out.requires_grad
