"""Zeroed int32 buffers for the wavefront kernels' ticket counter and flags, without a memset
per launch.

Every solve_fwd and solve_bwd launch needs 1 + (its chunks' flags) int32 zeros; a fresh
`torch.zeros` is an allocation and a memset kernel launch per call (about 7.5 us of host
time on the H200's host, run 25), twice per training step. Here each (device, stream) has
one pool buffer, zeroed once; a call takes the next unused slice of it (16-byte aligned,
so the kernels' specialization does not change), and when the pool runs out it is zeroed
again, on the same stream, behind every kernel that used a slice of it: one memset per many
calls. A kernel leaves its slice dirty; nothing ever hands that slice out again before the
next zeroing.

Plain `torch.zeros` is used instead where the pool cannot be trusted or does not pay: on
the CPU (the interpreter), while a CUDA graph is being captured (a captured launch would
replay on a slice that its first replay left dirty), inside `unpooled()` (the dfgen::
custom ops that torch.compile calls: CUDA graph trees run them eagerly in the graphs'
private memory pool before capturing, where the pool's buffer would be an allocation the
graphs do not track, and torch.compile refuses that), and for calls that need more than an
eighth of the pool.
"""

from __future__ import annotations

import contextlib
import threading

import torch

POOL_INTS = 1 << 20  # 4 MiB of int32 per (device, stream), kept for the process
_ALIGN = 4  # ints: slices start 16 bytes apart


class FlagPool:
    """Slices of one zeroed int32 buffer, handed out in order, none twice between two
    zeroings of the whole buffer (each slice starts 16-byte aligned)."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer.zero_()
        self.next = 0

    def take(self, n: int) -> torch.Tensor:
        start = self.next
        if start + n > self.buffer.numel():
            self.buffer.zero_()  # stream-ordered: after every launch that used a slice
            start = 0
        self.next = start + -(-n // _ALIGN) * _ALIGN
        return self.buffer[start:start + n]


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream)
_lock = threading.Lock()
_pools: dict[tuple, FlagPool] = {}  # by (device index, stream)
_local = threading.local()  # .unpooled: inside unpooled() on this thread


@contextlib.contextmanager
def unpooled():
    """Calls on this thread inside the block take fresh `torch.zeros`, not pool slices."""
    before = getattr(_local, "unpooled", False)
    _local.unpooled = True
    try:
        yield
    finally:
        _local.unpooled = before


def zeroed_flags(n: int, device: torch.device) -> torch.Tensor:
    """`n` int32 zeros on `device` for one launch on the current stream, to be launched on
    before this thread asks for more (another thread's calls on the same stream can wrap
    the pool only after 8 or more calls: a slice is launched on microseconds after)."""
    if (device.type != "cuda" or n > POOL_INTS // 8 or getattr(_local, "unpooled", False)
            or torch.cuda.is_current_stream_capturing()):
        return torch.zeros(n, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, _raw_stream(index))
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = FlagPool(torch.empty(POOL_INTS, dtype=torch.int32, device=device))
        return pool.take(n)
