"""cu_seqlens with max_seqlen is trusted (no host sync): bad offsets (past total_T,
decreasing) or a max_seqlen below the longest sequence must not make a kernel access
memory outside the tensors or its sync flags (before: garbage, SIGSEGV past total_T, or
waits on flags past the buffer). DFGEN_DEBUG=1 checks the offsets on the host instead."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dfgen.kernels.forward
import dfgen.settings
from conftest import DEVICE
from dfgen.errors import InputError
from dfgen.runtime import deltaformer_attn
from test_varlen import CONFIGS  # chunk-16 configs: several chunks at T = 40

TOTAL, H, D = 40, 2, 32
# (offsets, max_seqlen): past the packed length, decreasing, max_seqlen below the longest
BAD = {"past_total": ([0, 10, TOTAL + 24], 32), "decreasing": ([0, 30, 8, TOTAL], 32),
       "short_max_seqlen": ([0, 5, TOTAL], 16), "negative": ([-20, 12, TOTAL], 48)}


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, TOTAL, H, D, generator=gen).to(DEVICE) for _ in range(3))
    return q, k, v, torch.rand(1, TOTAL, H, generator=gen).to(DEVICE)


@pytest.fixture
def guarded(monkeypatch):
    """The solve stage's outputs (u, o, a, lse) inside NaN-poisoned storage, one tensor's
    size on each side: yields a function that asserts no write reached the poison."""
    real = dfgen.kernels.forward.solve_buffers
    storages = []

    def inside_poison(t):
        if t is None:
            return None
        n = t.numel()
        store = torch.full((3 * n,), float("nan"), dtype=t.dtype, device=t.device)
        storages.append((store, n))
        return store[n:2 * n].view(t.shape)

    def solve_buffers(q, module, **kwargs):
        u, o, a, lse, sync = real(q, module, **kwargs)
        return inside_poison(u), inside_poison(o), inside_poison(a), inside_poison(lse), sync

    monkeypatch.setattr(dfgen.kernels.forward, "solve_buffers", solve_buffers)

    def check():
        assert storages
        for store, n in storages:
            assert torch.isnan(store[:n]).all() and torch.isnan(store[2 * n:]).all(), \
                "a kernel wrote outside its output tensor"
    return check


@pytest.mark.parametrize("strategy", ["fused", "two_stage"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_offsets_stay_in_bounds(case, strategy, guarded):
    offsets, max_seqlen = BAD[case]
    q, k, v, beta = _inputs()
    leaves = [t.requires_grad_() for t in (q, k, v, beta)]
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    o = deltaformer_attn(*leaves, cu_seqlens=cu, max_seqlen=max_seqlen, config=CONFIGS[strategy])
    guarded()
    grads = torch.autograd.grad(o, leaves, torch.ones_like(o))  # the backward's kernels too
    assert [g.shape for g in grads] == [t.shape for t in leaves]


def test_offsets_far_past_the_packed_length_do_not_crash(tmp_path):
    """Offsets past total_T by 2**30 rows, forward and backward, both strategies: before
    the clamp this read unmapped memory (SIGSEGV); in a child process so a crash is a
    failure, not the end of the test session."""
    script = textwrap.dedent(f"""
        import torch
        from dfgen.kernels.config import KernelConfig
        from dfgen.runtime import deltaformer_attn
        import test_varlen_bounds as t
        for strategy in ("fused", "two_stage"):
            for offsets in ([0, 16, 2**30, 2**30 + 16], [0, 2**30], [0, 8, -2**30, {TOTAL}]):
                q, k, v, beta = (x.requires_grad_() for x in t._inputs())
                cu = torch.tensor(offsets, dtype=torch.int32, device=q.device)
                o = deltaformer_attn(q, k, v, beta, cu_seqlens=cu, max_seqlen=32,
                                     config=t.CONFIGS[strategy])
                o.sum().backward()
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__)] + sys.path), DFGEN_DEBUG="0")
    if DEVICE.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", \
        f"exit {proc.returncode}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("case", list(BAD))
def test_debug_mode_checks_the_offsets(case, monkeypatch):
    offsets, max_seqlen = BAD[case]
    monkeypatch.setattr(dfgen.settings, "DEBUG", True)
    q, k, v, beta = _inputs()
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    name = "max_seqlen" if case == "short_max_seqlen" else "cu_seqlens"
    with pytest.raises(InputError, match=name):
        deltaformer_attn(q, k, v, beta, cu_seqlens=cu, max_seqlen=max_seqlen, config=CONFIGS["fused"])
    good = torch.tensor([0, 17, TOTAL], dtype=torch.int32, device=DEVICE)
    deltaformer_attn(q, k, v, beta, cu_seqlens=good, max_seqlen=23, config=CONFIGS["fused"])


def test_debug_mode_is_read_from_the_environment():
    code = "import dfgen.settings as s; print(s.DEBUG)"
    for value, want in (("1", "True"), ("0", "False")):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DFGEN_DEBUG=value),
                             capture_output=True, text=True, timeout=120).stdout.strip()
        assert out == want


def test_without_max_seqlen_bad_offsets_raise():
    q, k, v, beta = _inputs()
    for offsets, _ in BAD.values():
        if offsets[-1] == TOTAL and offsets == sorted(offsets) and offsets[0] == 0:
            continue  # only max_seqlen is wrong there
        with pytest.raises(InputError, match="cu_seqlens"):
            deltaformer_attn(q, k, v, beta, cu_seqlens=torch.tensor(offsets, dtype=torch.int32,
                                                                    device=DEVICE))
