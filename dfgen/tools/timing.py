"""How dfgen times a call: triton.testing.do_bench's median on a GPU; without one, the
median of a few wall-clock runs in the interpreter (not GPU timings). The benchmark and
the tuner's candidates use the same timer."""

from __future__ import annotations

import statistics
import time


def timer(on_gpu: bool):
    if on_gpu:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time
