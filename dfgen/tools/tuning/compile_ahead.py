"""Compiling candidates ahead of the timing worker (`dfgen tune --jobs N`, GPU only).

The stage search asks its sampler for the next few candidates before the current one is
timed and hands them to N compile-only worker processes (worker.py, requests of op
"compile"). Each makes the stage's inputs at the bucket's shape as the timing worker does
and runs the stage with every Triton launch turned into a compile (evaluate.no_launch):
the same arguments give the same specialization, so the kernels land in Triton's on-disk cache
under the key the timing worker's first launch looks up, and that launch loads them
instead of compiling. Nothing is launched, so the GPU's timing is left alone. A compile
that fails or hangs costs nothing but its process (the timing worker then compiles, and
reports, as it would have). Triton's interpreter has nothing to compile: no processes.
"""

from __future__ import annotations

import atexit
import collections
import time

from .worker import Worker


class CompileAhead:
    """`jobs` compile-only worker processes fed with upcoming candidates; never blocks."""

    def __init__(self, jobs: int, timeout_s: float = 300.0):
        self.jobs, self.timeout_s = jobs, timeout_s
        self.workers = [Worker() for _ in range(jobs)]
        self.busy: dict[int, float] = {}  # worker index -> when its request was sent
        self.queue: collections.deque = collections.deque()
        self.compiled = self.failed = 0
        self.seconds = 0.0  # compile seconds spent in the processes
        atexit.register(self.close)

    @classmethod
    def for_device(cls, jobs: int, timeout_s: float = 300.0) -> "CompileAhead | None":
        """The processes on a GPU (None in the interpreter, or with jobs < 1)."""
        import torch

        if jobs < 1 or not torch.cuda.is_available():
            return None
        return cls(jobs, timeout_s)

    def submit(self, request: dict) -> None:
        """Compile the stage candidate `request` (an evaluate "stage" request) when a process
        is free."""
        self.queue.append(dict(request, op="compile"))
        self.pump()

    def forget(self) -> None:
        """Drop the candidates not yet handed out (the stage they belong to is over)."""
        self.queue.clear()
        self.pump()

    def pump(self) -> None:
        """Collect finished compiles, stop hung ones, hand out queued candidates."""
        now = time.monotonic()
        for index, worker in enumerate(self.workers):
            if index in self.busy:
                reply = worker.receive(0)
                if reply is None and now - self.busy[index] <= self.timeout_s:
                    continue
                if reply is None:  # hung: the timing worker will compile it if it comes up
                    worker.close()
                del self.busy[index]
                if reply is not None and reply.get("ok"):
                    self.compiled += 1
                    self.seconds += reply.get("seconds", 0.0)
                else:
                    self.failed += 1
            if self.queue and worker.send(self.queue[0]):
                self.queue.popleft()
                self.busy[index] = now

    def summary(self) -> str:
        return (f"{self.compiled} candidates compiled ahead by {self.jobs} processes "
                f"({self.seconds:.0f} s of compiling), {self.failed} failed or stopped")

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.busy.clear()
