"""dfgen/kernels/launcher.py: the first launch of a call signature goes through Triton and
its compiled kernel is kept; a later launch with that signature calls the kept kernel's
launcher with the arguments Triton would pass; anything Triton specializes on that
changes (alignment, an int, a dtype, a constexpr, the options) takes Triton's path again;
patched or hooked launches always do. The stand-in tests run anywhere; the GPU test
compares results through both paths."""

import pytest
import torch
import triton
import triton.language as tl

from dfgen.kernels import launcher

from conftest import DEVICE, ON_GPU


def _plain_jit():
    """A real JITFunction (not the interpreter's), whatever TRITON_INTERPRET says: built
    directly, not through triton.jit (and never compiled here)."""
    def scale_kernel(X, Y, n, alpha, FLAG: tl.constexpr, BLOCK: tl.constexpr = 16):
        i = tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < n) * alpha, mask=i < n)
    fn = triton.JITFunction(scale_kernel)
    assert type(fn) is triton.runtime.jit.JITFunction
    return fn


class _Compiled:
    """Stands in for Triton's CompiledKernel: records what its launcher is called with."""
    def __init__(self):
        self.calls = []
        self.function, self.packed_metadata = "function", "metadata"

    def run(self, *args):
        self.calls.append(args)


@pytest.fixture
def stand_in(monkeypatch):
    fn = _plain_jit()
    triton_calls = []

    def triton_run(*args, grid, warmup, **kwargs):  # Triton's path: "compiles" and launches
        triton_calls.append((grid, args, kwargs))
        return compiled
    compiled = _Compiled()
    monkeypatch.setattr(fn, "run", triton_run)  # the instance's; JITFunction.run stays Triton's
    monkeypatch.setattr(launcher, "_current_device", lambda: 0)
    monkeypatch.setattr(launcher, "_raw_stream", lambda device: 1234)
    kernel = launcher.FastKernel(fn)
    kernel._enabled = True
    return kernel, triton_calls, compiled


def test_a_kept_kernel_is_launched_with_triton_s_arguments(stand_in):
    kernel, triton_calls, compiled = stand_in
    x, y = torch.randn(32), torch.empty(32)
    kernel[(3,)](x, y, 32, 0.5, FLAG=True, num_warps=4)
    assert len(triton_calls) == 1 and compiled.calls == []
    kernel[(3,)](x, y, 32, 0.25, FLAG=True, num_warps=4)  # a float's value is not specialized
    assert len(triton_calls) == 1
    (call,) = compiled.calls
    # grid padded to 3 dims, the stream, the handles, no launch metadata or hooks, then the
    # kernel's parameters in order: positional ones, constexprs by name, defaults filled in
    assert call[:9] == (3, 1, 1, 1234, "function", "metadata", None, None, None)
    assert call[9:13] == (x, y, 32, 0.25) and call[13:] == (True, 16)


@pytest.mark.parametrize("change", ["misaligned", "int", "bool for int", "dtype", "constexpr", "option",
                                    "kwargs order"])
def test_a_new_signature_takes_triton_s_path(stand_in, change):
    kernel, triton_calls, compiled = stand_in
    x, y = torch.randn(33), torch.empty(32)
    args, kwargs = [x[:32], y, 32, 0.5], dict(FLAG=True, num_warps=4)
    if change == "bool for int":
        args[2] = 1
    kernel[(1,)](*args, **kwargs)
    if change == "misaligned":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "int":
        args[2] = 31
    elif change == "bool for int":
        args[2] = True  # equal to 1 in Python, an i1 to Triton
    elif change == "dtype":
        args[0] = x[:32].double()
    elif change == "constexpr":
        kwargs["FLAG"] = False
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        kwargs = dict(num_warps=4, FLAG=True)
    kernel[(1,)](*args, **kwargs)
    assert len(triton_calls) == 2 and compiled.calls == []
    kernel[(1,)](*args, **kwargs)
    assert len(triton_calls) == 2 and len(compiled.calls) == 1


def test_patched_or_hooked_launches_take_triton_s_path(stand_in, monkeypatch):
    kernel, triton_calls, compiled = stand_in
    x, y = torch.randn(32), torch.empty(32)
    kernel[(1,)](x, y, 32, 0.5, FLAG=True)
    from triton import knobs
    before = knobs.runtime.launch_enter_hook
    hook = lambda *a: None  # noqa: E731
    if hasattr(before, "add"):  # a HookChain (Triton after 3.6)
        before.add(hook)
        kernel[(1,)](x, y, 32, 0.5, FLAG=True)
        before.remove(hook)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
        kernel[(1,)](x, y, 32, 0.5, FLAG=True)
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", before)
    from triton.runtime.jit import JITFunction
    original = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: original(self, *a, **k))  # no_launch
    kernel[(1,)](x, y, 32, 0.5, FLAG=True)
    monkeypatch.setattr(JITFunction, "run", original)
    kernel[(1,)](x, y, 32, {"unhashable": 1}, FLAG=True)
    assert len(triton_calls) == 4 and compiled.calls == []
    kernel._enabled = False  # DFGEN_TRITON_LAUNCH=1
    kernel[(1,)](x, y, 32, 0.5, FLAG=True)
    assert len(triton_calls) == 5 and compiled.calls == []


def test_the_kept_signatures_are_bounded(stand_in, monkeypatch):
    kernel, triton_calls, compiled = stand_in
    monkeypatch.setattr(launcher, "_MAX_SIGNATURES", 4)
    x, y = torch.randn(64), torch.empty(64)
    for n in range(10):
        kernel[(1,)](x, y, n, 0.5, FLAG=True)
    assert len(kernel._kept) <= 4


def test_attributes_are_the_kernel_s(stand_in):
    kernel, _, _ = stand_in
    assert kernel.arg_names == ["X", "Y", "n", "alpha", "FLAG", "BLOCK"]
    assert launcher.unwrap(kernel) is kernel.fn and launcher.unwrap(kernel.fn) is kernel.fn


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_kept_kernels_give_what_triton_s_path_gives(monkeypatch):
    """The runtime's kernels through kept launches and through Triton's path: equal outputs,
    gradients included, and a misaligned input view is served correctly."""
    from dfgen.kernels import build
    from dfgen.runtime import deltaformer_attn
    from dfgen.tools.check import random_pass_inputs

    q, k, v, beta, do, _ = random_pass_inputs((2, 77, 3, 64), torch.bfloat16, DEVICE, seed=3)

    def step(q, k, v, beta):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, beta)]
        o = deltaformer_attn(*leaves)
        o.backward(do)
        return [o] + [t.grad for t in leaves]
    first = step(q, k, v, beta)
    kept = step(q, k, v, beta)  # the second call launches kept kernels
    wrapped = [getattr(m, n) for m in build._loaded.values() for n in dir(m) if n.endswith("_kernel")]
    assert any(isinstance(w, launcher.FastKernel) and w._kept for w in wrapped)
    monkeypatch.setenv("DFGEN_TRITON_LAUNCH", "1")
    for w in wrapped:
        if isinstance(w, launcher.FastKernel):
            monkeypatch.setattr(w, "_enabled", False)
    plain = step(q, k, v, beta)
    for a, b, c in zip(first, kept, plain):
        assert torch.equal(a, b) and torch.equal(a, c)
    monkeypatch.undo()
    wide = torch.randn(2, 77, 3, 65, dtype=torch.bfloat16, device=DEVICE)
    wide[..., 1:] = q
    shifted = wide[..., 1:]  # unit stride on D, 2 bytes past each row's alignment
    assert shifted.data_ptr() % 16 != 0
    for a, b in zip(step(shifted, k, v, beta), first):
        torch.testing.assert_close(a, b)
