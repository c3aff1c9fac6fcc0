"""deltaformer_attn refuses bad input with errors that name the argument; importing the
runtime has no side effects."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.errors import ConfigError, InputError
from dfgen.runtime import deltaformer_attn


def qkv(B=1, T=8, H=2, D=32, dtype=torch.float32):
    return [torch.randn(B, T, H, D, dtype=dtype, device=DEVICE) for _ in range(3)]


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(InputError, match="q must be \\[B, T, H, D\\]"):
        deltaformer_attn(q[0], k, v)


def test_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(InputError, match="same shape"):
        deltaformer_attn(q, k[:, :4], v)


def test_unsupported_head_dim():
    q, k, v = qkv(D=48)
    with pytest.raises(InputError, match="head dim D=48"):
        deltaformer_attn(q, k, v)


def test_dtypes():
    q, k, v = qkv()
    with pytest.raises(InputError, match="float16, bfloat16 or float32"):
        deltaformer_attn(q.double(), k.double(), v.double())
    with pytest.raises(InputError, match="k has dtype torch.float16"):
        deltaformer_attn(q, k.half(), v)


def test_beta_checks():
    q, k, v = qkv()
    with pytest.raises(InputError, match="beta must have shape"):
        deltaformer_attn(q, k, v, torch.rand(1, 8, 3, device=DEVICE))
    with pytest.raises(InputError, match="beta must be a floating tensor"):
        deltaformer_attn(q, k, v, torch.ones(1, 8, 2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(InputError, match="beta must be a torch.Tensor"):
        deltaformer_attn(q, k, v, 0.5)


def test_last_dim_must_be_contiguous():
    q, k, v = qkv()
    q_t = torch.randn(1, 8, 32, 2, device=DEVICE).transpose(2, 3)  # [1, 8, 2, 32], stride 2 on D
    with pytest.raises(InputError, match="q must be contiguous in its last dim"):
        deltaformer_attn(q_t, k, v)


def test_bad_config_names_the_knob():
    q, k, v = qkv()
    solve = dict(default_config(32).solve)
    with pytest.raises(ConfigError, match="CHUNK=5"):
        deltaformer_attn(q, k, v, config={"solve": {**solve, "CHUNK": 5}})
    with pytest.raises(ConfigError, match="unknown \\['CHUNKS'\\]"):
        deltaformer_attn(q, k, v, config={"solve": {**solve, "CHUNKS": 64}})


def test_a_config_section_may_leave_out_knobs():
    """The knobs a section leaves out come from the built-in default's section."""
    from dfgen.api.resolve import resolve_config

    q, k, v = qkv()
    default = default_config(32, torch.float32)
    config = resolve_config({"solve": {"CHUNK": 16, "BLOCK_N": 16, "LOOKAHEAD": 1}}, q, True)
    assert config.solve == {**default.solve, "CHUNK": 16, "BLOCK_N": 16, "LOOKAHEAD": 1}
    assert config.solve_bwd == default.solve_bwd


@pytest.mark.parametrize("bad, message", [
    ({"solve": {"CHUNK": 64.0}}, "CHUNK=64.0 is not one of .*float; expected int"),
    ({"solve": {"LOOKAHEAD": True}}, "LOOKAHEAD=True is not one of .*bool; expected int"),
    ({"solve": {"INV_FP16": 1}}, "INV_FP16=1 is not one of"),
    ({"strategy": "two_stage", "attn": {"num_stages": 2.0}}, "attn_fwd: num_stages=2.0"),
    ({"solve": {"CHUNK": [64]}}, "CHUNK=\\[64\\]"),
    ({"solve": {7: 64}}, "knob names must be strings"),
    ({"solve": [("CHUNK", 64)]}, "section 'solve' must be a mapping"),
    ([{"strategy": "fused"}], "config must be a KernelConfig, a dict or None, got list"),
    ("fused", "config must be a KernelConfig, a dict or None, got str"),
])
def test_malformed_configs_are_config_errors_and_leave_nothing_behind(bad, message):
    """Wrong types, structure or knob names are ConfigErrors naming the problem (not
    TypeError, AttributeError or a crash in the kernels' launch code), and the default
    still serves afterwards: a rejected config leaves no memo that matches another's."""
    q, k, v = qkv(T=4)
    before = deltaformer_attn(q, k, v, config=default_config(32, torch.float32))  # memoized first
    with pytest.raises(ConfigError, match=message):
        deltaformer_attn(q, k, v, config=bad)
    if isinstance(bad, dict):
        with pytest.raises(ConfigError, match=message):
            KernelConfig.from_dict(bad, defaults=default_config(32, torch.float32)).check(32, True)
    assert torch.equal(deltaformer_attn(q, k, v), before)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (t.cpu() for t in qkv())
    with pytest.raises(InputError, match="need a CUDA device, or TRITON_INTERPRET=1"):
        deltaformer_attn(q, k, v)


def test_import_has_no_side_effects(tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys, dfgen.runtime; "
            "bad = [m for m in ('optuna', 'dfgen.tools', 'dfgen.tools.cli', 'dfgen.tools.check', 'dfgen.reference', 'triton') if m in sys.modules]; "
            "print(bad)")
    env = dict(os.environ, DFGEN_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert out.stdout.strip() == "[]"
    assert not cache.exists()
