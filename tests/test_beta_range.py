"""beta in [0, 2] (sigmoid or 2*sigmoid in models) with the default config matches the
reference in every dtype, forward and backward; past 2 the 16-bit inverse must not turn
into a silent NaN where the reference is finite and moderate.

The hard case for the float16 inverse (INV_FP16, the 16-bit default) is flat attention
in a sequence's first chunk: there the in-chunk rows' probabilities sum to 1, so beta > 1
makes the powers of beta P grow (cancelling in the inverse's sum; overflowing float16 near
beta = 8). Chunk 64 (the default) at T = 64: that chunk is the whole sequence."""

import pytest
import torch

from conftest import DEVICE, DTYPES
from dfgen.kernels.config import default_config
from dfgen.runtime import deltaformer_attn
from dfgen.tools.check import GRAD_TOLERANCE, TOLERANCE, reference, relative_error

T, H, D = 64, 1, 16


def _inputs(dtype, beta, qk_scale, seed=2):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, T, H, D, generator=gen) for _ in range(4))
    q, k = q * qk_scale, k * qk_scale  # small scores: flat attention
    if beta == "2sig":
        b = 2 * torch.sigmoid(3 * torch.randn(1, T, H, generator=gen))
    else:
        b = torch.full((1, T, H), float(beta))
    return [t.to(dtype).to(DEVICE) for t in (q, k, v, do)] + [b.to(DEVICE)]


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("beta,qk_scale", [("2", 0.3), ("2sig", 0.3), ("1.5", 1.0)])
def test_beta_up_to_2_matches_the_reference(dtype, beta, qk_scale):
    dt = DTYPES[dtype]
    q, k, v, do, b = _inputs(dt, beta, qk_scale)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
    o = deltaformer_attn(*leaves, config=default_config(D, dt))
    grads = torch.autograd.grad(o, leaves, do)
    ref_o, ref_grads = reference(q, k, v, b, do, True, torch.float64)
    err = relative_error(o, ref_o)
    assert err < TOLERANCE[dt], f"o: relative error {err:.2e}"
    for name, g, r in zip(("dq", "dk", "dv", "dbeta"), grads, ref_grads):
        err = relative_error(g, r)
        assert err < GRAD_TOLERANCE[dt], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_large_beta_takes_float32_solves(dtype):
    """beta = 8 on flat attention: the reference is moderate (|o| <= 16), while the float16
    inverse's products cancel (garbage, then NaN as they pass 65504). large_beta=True
    builds the inverse from float32 products: finite and of the right size, not accurate
    (u is still rounded to 16 bits in storage and the solve expands it: the H200 gave a
    relative error of 0.48, the interpreter under 0.1)."""
    dt = DTYPES[dtype]
    q, k, v, do, b = _inputs(dt, 8.0, 0.0)
    ref_o, _ = reference(q, k, v, b, do, False, torch.float64)
    assert torch.isfinite(ref_o).all() and ref_o.abs().max() < 100
    o = deltaformer_attn(q, k, v, b, large_beta=True)
    assert torch.isfinite(o).all(), "non-finite output"
    assert o.abs().max() < 10 * ref_o.abs().max() and relative_error(o, ref_o) < 1.0
    leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
    grads = torch.autograd.grad(deltaformer_attn(*leaves, large_beta=True), leaves, do)
    assert all(torch.isfinite(g).all() for g in grads)


def test_large_beta_sets_float32_solves_on_any_config():
    from dfgen.api.resolve import resolve_config

    q = torch.zeros(1, 8, 1, D, dtype=torch.bfloat16, device=DEVICE)
    config = resolve_config(None, q, True, large_beta=True)
    for section in (config.solve, config.solve_bwd):
        assert section["INV_FP16"] is False and section["SOLVE_PRECISION"] == "tf32x3"
    assert resolve_config(None, q, True).solve["INV_FP16"] is True  # the fast default


def test_debug_mode_refuses_beta_past_2_without_large_beta(monkeypatch):
    from dfgen import settings
    from dfgen.errors import InputError

    monkeypatch.setattr(settings, "DEBUG", True)
    q, k, v, _, b = _inputs(torch.bfloat16, 3.0, 1.0)
    with pytest.raises(InputError, match="large_beta=True"):
        deltaformer_attn(q, k, v, b)
    deltaformer_attn(q, k, v, b, large_beta=True)
    deltaformer_attn(q, k, v, b * 0.5)  # |beta| <= 2 passes
