"""Every supported head dim x dtype x pass, as a user calls it (config=None: the tuned file
or the built-in default this device picks), against the reference: a padded batch whose
T no block divides, and (on a GPU) packed sequences of uneven lengths."""

import pytest
import torch

from conftest import DEVICE, ON_GPU
from dfgen.runtime import SUPPORTED_HEAD_DIMS, deltaformer_attn
from conftest import DTYPES
from dfgen.tools.check import GRAD_TOLERANCE, TOLERANCE, random_pass_inputs, reference, relative_error

REF = torch.float32 if ON_GPU else torch.float64
PADDED = (2, 777, 4) if ON_GPU else (1, 19, 2)  # (B, T, H)
PACKED = [1, 300, 129, 64, 6] if ON_GPU else [1, 9, 5]  # sequence lengths, H = 2


def _check(outputs, expected, dtype, backward, what):
    names = ("o", "dq", "dk", "dv", "dbeta", "dq_solve")
    bound = (GRAD_TOLERANCE if backward else TOLERANCE)[dtype]
    for name, got, want in zip(names, outputs, expected):
        assert got.shape == want.shape, f"{what} {name}: shape {tuple(got.shape)}"
        assert torch.isfinite(got).all(), f"{what} {name}: non-finite values"
        err = relative_error(got, want)
        assert err <= bound, f"{what} {name}: relative error {err:.2e} > {bound:.0e}"


def _run(q, k, v, beta, do, backward, **kwargs):
    if not backward:
        with torch.no_grad():
            return (deltaformer_attn(q, k, v, beta, **kwargs),)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, beta)]
    o = deltaformer_attn(*leaves, **kwargs)
    return (o.detach(), *torch.autograd.grad(o, leaves, do))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_padded_batch(head_dim, dtype_name, backward):
    dtype = DTYPES[dtype_name]
    q, k, v, beta, do, _ = random_pass_inputs((*PADDED, head_dim), dtype, DEVICE, seed=head_dim)
    got = _run(q, k, v, beta, do, backward)
    o_ref, grads_ref = reference(q, k, v, beta, do, backward, REF)
    _check(got, (o_ref, *grads_ref), dtype, backward, f"{PADDED} d{head_dim} {dtype_name}")


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16", "fp32"] if ON_GPU else ["bf16"])
@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS if ON_GPU else (16,))
def test_packed_sequences(head_dim, dtype_name, backward):
    dtype = DTYPES[dtype_name]
    total = sum(PACKED)
    q, k, v, beta, do, _ = random_pass_inputs((1, total, 2, head_dim), dtype, DEVICE, seed=7)
    bounds = torch.tensor([0] + PACKED, device=DEVICE).cumsum(0).to(torch.int32)
    got = _run(q, k, v, beta, do, backward, cu_seqlens=bounds)
    # the reference, one sequence at a time
    pieces = []
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        sl = slice(start, end)
        o_ref, grads_ref = reference(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], do[:, sl], backward, REF)
        pieces.append((o_ref, *grads_ref))
    expected = [torch.cat(parts, dim=1) for parts in zip(*pieces)]
    _check(got, expected, dtype, backward, f"packed {PACKED} d{head_dim} {dtype_name}")


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16", "fp32"] if ON_GPU else ["fp16"])
@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS if ON_GPU else (16,))
def test_grouped_heads_with_q_solve(head_dim, dtype_name):
    """Forward and backward with 4 query heads on 2 key/value heads and the solve stage's
    own queries (the two-stage path and its own backward)."""
    dtype = DTYPES[dtype_name]
    T = 333 if ON_GPU else 21
    q, k, v, beta, do, q_solve = random_pass_inputs((1, T, 4, head_dim), dtype, DEVICE, seed=3,
                                                    with_q_solve=True)
    k, v = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    leaves = [t.detach().requires_grad_() for t in (q, k, v, beta, q_solve)]
    o = deltaformer_attn(*leaves[:4], q_solve=leaves[4])
    got = (o.detach(), *torch.autograd.grad(o, leaves, do))
    o_ref, grads_ref = reference(q, k, v, beta, do, True, REF, q_solve=q_solve)
    _check(got, (o_ref, *grads_ref), dtype, True, f"grouped q_solve d{head_dim} {dtype_name}")


def test_narrow_16bit_head_dims_run_the_32_wide_kernels():
    """fp16/bf16 inputs of head dim 16 are zero-padded to 32 columns (Triton 3.6 miscompiles
    some 16-column 16-bit tiles for Hopper); float32 keeps its own kernels."""
    from dfgen.kernels.forward import kernel_head_dim

    assert kernel_head_dim(16, torch.float16) == 32 and kernel_head_dim(16, torch.bfloat16) == 32
    assert kernel_head_dim(16, torch.float32) == 16
    assert [kernel_head_dim(d, torch.bfloat16) for d in (32, 64, 128)] == [32, 64, 128]


def test_one_stage_solve_is_refused_below_head_dim_64():
    """The unpipelined solve_fwd kernel is miscompiled for Hopper at 32-column 16-bit tiles
    (H200: wrong results, an illegal memory access with the retired SPLIT_SOLVE): a config
    asking for it at head dims 16 and 32 is a ConfigError, and the tuner never samples it
    there."""
    from dfgen.kernels.config import default_config
    from dfgen.errors import ConfigError
    from dfgen.kernels.spec import spec

    for head_dim in (16, 32):
        config = default_config(head_dim, torch.bfloat16).to_dict()
        config["solve"] = dict(config["solve"], num_stages=1)
        with pytest.raises(ConfigError, match="num_stages > 1"):
            deltaformer_attn(*random_pass_inputs((1, 8, 1, head_dim), torch.bfloat16, DEVICE, seed=0)[:4],
                             config=config)
        assert (1,) not in spec("solve_fwd").feasible_combinations(("num_stages",), head_dim)
    assert (1,) in spec("solve_fwd").feasible_combinations(("num_stages",), 64)


def test_narrow_key_blocks_under_wide_chunks_are_refused_at_head_dim_32():
    """16-key blocks under 64-row chunks at head dim 32 end in an illegal memory access on
    the H200 in fp16 and bf16 (Triton 3.6): refused with the constraint named, never sampled
    by the tuner there; head dim 64 and 32-row chunks keep them."""
    from dfgen.kernels.config import default_config
    from dfgen.errors import ConfigError
    from dfgen.kernels.spec import spec

    config = default_config(32, torch.float16).to_dict()
    config["solve"] = dict(config["solve"], CHUNK=64, BLOCK_N=16)
    with pytest.raises(ConfigError, match="BLOCK_N >= 32 or CHUNK <= 32"):
        deltaformer_attn(*random_pass_inputs((1, 8, 1, 32), torch.float16, DEVICE, seed=0)[:4],
                         config=config)
    group = next(g for g in spec("solve_fwd").knob_groups() if "CHUNK" in g)

    def pairs(head_dim):
        return {(c[group.index("CHUNK")], c[group.index("BLOCK_N")])
                for c in spec("solve_fwd").feasible_combinations(group, head_dim)}
    assert (64, 16) not in pairs(32) and (128, 16) not in pairs(32) and (32, 16) in pairs(32)
    assert (64, 16) in pairs(64)
