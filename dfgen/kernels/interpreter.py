"""Triton's CPU interpreter (TRITON_INTERPRET=1): detection and one known bug's fix.

triton 3.9's interpreter keeps bfloat16 tensors as uint16 bit patterns and feeds those
straight to numpy.matmul in tl.dot, so a bf16 dot returns garbage (loads, stores and
casts are right). The patch widens bf16 operands to float32 first, which is exact: a
bf16 x bf16 product fits in float32, the same as the GPU's MMA with float32 accumulation.
Applied only when the interpreter is active, and only once.
"""

from __future__ import annotations

from ..settings import interpreter_active

_patched = False


def _bf16_bits_to_float32(data):
    import numpy as np

    return (data.astype(np.uint32) << 16).view(np.float32)


def patch_interpreter_if_active() -> None:
    global _patched
    if _patched or not interpreter_active():
        return
    from triton.runtime import interpreter as interp
    import triton.language as tl

    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None:
        return

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a = _widen(a)
            b = _widen(b)
        return original(self, a, b, d, *args, **kwargs)

    def _widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interp.TensorHandle(_bf16_bits_to_float32(handle.data), tl.float32)

    builder.create_dot = create_dot
    _patched = True
