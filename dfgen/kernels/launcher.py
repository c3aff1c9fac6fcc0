"""Launching a generated kernel with less host time than Triton's `kernel[grid](...)`.

Per call, Triton's JITFunction.run reads its settings, binds and specializes every
argument, builds a cache key from the specialization and the options, looks the compiled
kernel up, checks the globals the kernel used, asks for launch metadata and calls the
compiled launcher: about 37 us per launch of dfgen's forward solve on the H200's host,
where the launcher itself takes 7 (run 25). A forward call launches one kernel, a
forward+backward four: at short sequences that host time is most of the call.

`FastKernel` wraps a module's kernel (build.py wraps every `*_kernel` of a generated
module) and keeps what Triton's path computes per call once per distinct call signature:
the first launch with a signature goes through Triton (compiling if needed) and its
compiled kernel is kept under that signature; later launches with it call the compiled
launcher directly. The signature holds everything Triton specializes on, and more:
each tensor's dtype and whether its address is 16-byte aligned, every int's value (Triton
specializes on == 1 and on divisibility by 16), every other argument's type or value
(constexprs, bools, None), the launch options, and the device. So a kept kernel is only
ever launched with arguments Triton would have launched that same kernel with.

Triton's own path is taken whenever the shortcut could differ from it: under the
interpreter, when a launch hook is set (profilers), when JITFunction.run is patched (the
tuner's compile-only launches, dfgen.tools.tuning.evaluate.no_launch), when the kernel
has pre-run hooks, and when DFGEN_TRITON_LAUNCH=1 asks for it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from ..settings import interpreter_active, triton_launch

# What Triton's CUDA driver asks for the current device and stream (torch's raw calls).
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda device: torch.cuda.current_stream(device).cuda_stream)

_MAX_SIGNATURES = 256  # per kernel: shapes of a long-running job come and go


def _enabled() -> bool:
    return not triton_launch() and not interpreter_active()


class FastKernel:
    """A Triton JITFunction, launched as `kernel[grid](*args, **kwargs)` like the original
    (every other attribute is the original's)."""

    __slots__ = ("fn", "_kept", "_enabled", "_triton_run", "_runtime")

    def __init__(self, fn):
        from triton import knobs
        from triton.runtime.jit import JITFunction

        self.fn = fn
        self._kept: dict[tuple, tuple] = {}
        self._enabled = _enabled()
        self._triton_run = JITFunction.run  # a later patch of it turns the shortcut off
        self._runtime = knobs.runtime  # where launch hooks are set

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict):
        fn = self.fn
        if not self._enabled or type(fn).run is not self._triton_run or getattr(fn, "pre_run_hooks", None):
            return fn[grid](*args, **kwargs)
        runtime = self._runtime
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook) or callable(grid):
            return fn[grid](*args, **kwargs)
        device = _current_device()
        try:
            key = (device, _signature(args), _signature(kwargs.values()), tuple(kwargs))
            kept = self._kept.get(key)
        except TypeError:  # an argument that cannot be hashed: Triton's path
            return fn[grid](*args, **kwargs)
        if kept is None:
            kernel = fn[grid](*args, **kwargs)  # Triton's path: compiles, launches, returns it
            self._keep(key, kernel, args, kwargs)
            return kernel
        kernel, tail = kept
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        stream = _raw_stream(device)
        kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *args, *[kwargs[name] if name in kwargs else value for name, value in tail])
        return kernel

    def _keep(self, key: tuple, kernel, args: tuple, kwargs: dict) -> None:
        """Keep `kernel` (what Triton launched) for this signature, with the parameters
        after the positional ones in the kernel's order (their defaults where not given)."""
        if kernel is None or not hasattr(kernel, "packed_metadata"):
            return  # (a compile-only launch, or a Triton whose kernels look otherwise)
        params = self.fn.params
        if len(args) > len(params) or any(p.name in kwargs for p in params[:len(args)]):
            return
        tail = []
        for param in params[len(args):]:
            if param.name not in kwargs and param.default is inspect.Parameter.empty:
                return
            tail.append((param.name, kwargs.get(param.name, param.default)))
        if len(self._kept) >= _MAX_SIGNATURES:
            self._kept.clear()
        self._kept[key] = (kernel, tuple(tail))


def _hooked(hook) -> bool:
    """A launch hook is set: a callable (Triton 3.6), or a HookChain holding one (later)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or bool(calls)


def _signature(values) -> tuple:
    """What a launch's arguments are to Triton's specialization, and more: an int's value
    (Triton specializes on == 1 and on divisibility by 16), a tensor's dtype and 16-byte
    alignment, a float's type, any other value with its type (True and 1 are equal in
    Python, not to Triton: a bool is an i1, an int 1 a constant). One comprehension with
    the commonest case (an int) first: this runs on every launch (about 3 us for the
    forward solve's 45 arguments, where a loop of isinstance tests took 8)."""
    return tuple([value if type(value) is int
                  else (value.dtype, value.data_ptr() & 15 == 0) if isinstance(value, Tensor)
                  else float if type(value) is float
                  else (value.__class__, value)
                  for value in values])


def wrap_kernels(module) -> None:
    """Launch the generated module's kernels (its `*_kernel` JITFunctions) through
    FastKernel; nothing under the interpreter or without a GPU (compile-only tools)."""
    if not _enabled() or not torch.cuda.is_available():
        return
    from triton.runtime.jit import JITFunction

    for name, value in list(vars(module).items()):
        if name.endswith("_kernel") and type(value) is JITFunction:
            setattr(module, name, FastKernel(value))


def unwrap(kernel):
    """The JITFunction behind a module's kernel attribute (itself if not wrapped)."""
    return kernel.fn if isinstance(kernel, FastKernel) else kernel
