"""The tuner's long-lived worker: one process per GPU (one without a GPU) that keeps torch
and Triton imported and a bucket's stage inputs allocated, and checks and times the
candidates it is sent, one at a time, over a pipe (evaluate.py says what it does with
each). A candidate that crashes the process or runs past its timeout is recorded as a
failed trial with its reason, and the process is replaced: the next candidate starts a
fresh one. compile_ahead.py runs more of these processes, compiling only.

    python -m dfgen.tools.tuning.worker     (started by Worker; not a user command)

Protocol, one JSON object per line: the worker writes {"ready": true, "pid"} once it has
imported what it needs, then reads one request per line from stdin and answers each with
one line ({"ok": ..., "pid", ...}). Its stdout carries the protocol alone: whatever else
writes to it (Triton, a kernel's print) goes to stderr, whose last lines name a crash.

A test hook, honoured only with DFGEN_WORKER_TEST_FAULTS=1 in the worker's environment: a
request's "test_fault" "exit" ends the process at once (os._exit(1)), "hang" sleeps past
any timeout. Without the variable the field is ignored.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

STARTUP_TIMEOUT_S = 180.0  # importing torch and triton (a cold GPU host can take a while)
TEST_FAULTS = "DFGEN_WORKER_TEST_FAULTS"


class Worker:
    """One worker process seen from the tuner: `call()` sends a request and waits for its
    reply (at most a timeout, never past a deadline); `send()` and `receive()` do the same
    in two steps (compile_ahead.py keeps several busy at once). The process starts on
    first use and again after it crashed, hung or was closed."""

    def __init__(self, env: dict | None = None):
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.startup_s = 0.0  # how long the last start took (the tuner's budget reserves it)
        self.starts = 0
        self._buffer = b""
        self._stderr: collections.deque = collections.deque(maxlen=40)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process unless it runs (returns at once; it signals ready later)."""
        if self.alive():
            return
        self.close()
        self.proc = subprocess.Popen([sys.executable, "-m", "dfgen.tools.tuning.worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.env or os.environ.copy(),
                                     start_new_session=True)  # its own group: a kill takes its compilers
        self.ready, self._buffer, self.starts = False, b"", self.starts + 1
        self._started_at = time.monotonic()
        self._stderr = collections.deque(maxlen=40)
        threading.Thread(target=_drain, args=(self.proc.stderr, self._stderr), daemon=True).start()

    def call(self, request: dict, timeout_s: float, deadline: float | None = None) -> dict:
        """The reply to `request` ({"ok": ...}, with "seconds": its wall time, the
        process's start-up not counted), or a failure: "timed out" after `timeout_s`,
        "crashed" if the process died, {"cut": true} if `deadline` (time.monotonic())
        came first. A timed-out or cut candidate's process is killed."""
        reason = self.wait_ready(deadline)
        if reason is not None:
            return reason
        limit = _limit(timeout_s, deadline)
        if limit <= 0:
            return {"ok": False, "cut": True, "reason": "cut: no time left in the bucket"}
        started = time.monotonic()
        if not self.send(request):
            return {"ok": False, "reason": self._crash_reason()}
        reply = self.receive(limit)
        ran = time.monotonic() - started
        if reply is None:  # still running: hung, or past the bucket's deadline
            self.close()
            if limit < timeout_s:
                return {"ok": False, "cut": True,
                        "reason": f"cut at the bucket's time limit after {ran:.0f} s"}
            return {"ok": False, "reason": f"timed out after {timeout_s:g} s"}
        if reply.get("restart"):  # its GPU context is lost: it exits; the next call starts anew
            self.close()
        return dict(reply, seconds=ran)

    def wait_ready(self, deadline: float | None = None) -> dict | None:
        """Start the process if needed and wait until it is ready; None once ready, else
        the failure (a cut one if `deadline` came first)."""
        self.start()
        if self.ready:
            return None
        line = self._read_line(_limit(STARTUP_TIMEOUT_S, deadline, self._started_at))
        if line is not None and line.get("ready"):
            self.ready = True
            self.startup_s = time.monotonic() - self._started_at
            return None
        crashed = not self.alive()
        reason = self._crash_reason() if crashed or line is not None else None
        self.close()
        if reason is not None:
            return {"ok": False, "reason": "the worker did not start: " + reason}
        if deadline is not None and time.monotonic() >= deadline - 0.01:
            return {"ok": False, "cut": True, "reason": "cut while the worker was starting"}
        return {"ok": False, "reason": f"the worker did not start within {STARTUP_TIMEOUT_S:g} s"}

    def send(self, request: dict) -> bool:
        """Write one request (the process reads it when it is ready); False if it died."""
        self.start()
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def receive(self, timeout: float) -> dict | None:
        """The next reply within `timeout` seconds (0: only one already there), skipping
        the ready line; None if none came; a crash reply if the process died."""
        end = time.monotonic() + max(0.0, timeout)
        while True:
            line = self._read_line(max(0.0, end - time.monotonic()))
            if line is None:
                if self.proc is not None and self.proc.poll() is not None and b"\n" not in self._buffer:
                    reason = self._crash_reason()
                    self.close()
                    return {"ok": False, "reason": reason}
                return None
            if line.get("ready"):
                self.ready = True
                self.startup_s = time.monotonic() - self._started_at
                continue
            return line

    def close(self) -> None:
        """Kill the process and whatever it started (its process group)."""
        proc, self.proc, self.ready = self.proc, None, False
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        proc.wait()

    def _read_line(self, timeout: float) -> dict | None:
        """One JSON line from the process within `timeout` s; None if none (or EOF)."""
        if self.proc is None:
            return None
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = end - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(0.0, left))
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the process ended
                self.proc.wait()
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return {"ok": False, "reason": f"unreadable reply {line[:200]!r}"}

    def _crash_reason(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        time.sleep(0.05)  # the last stderr lines
        tail = [line for line in self._stderr if line.strip()][-1:] or ["no output"]
        return f"crashed (exit {code}): {tail[0][:300]}"


def _limit(timeout_s: float, deadline: float | None, since: float | None = None) -> float:
    left = timeout_s - (time.monotonic() - since if since is not None else 0.0)
    return left if deadline is None else min(left, deadline - time.monotonic())


def _drain(stream, lines: collections.deque) -> None:
    for raw in iter(stream.readline, b""):
        lines.append(raw.decode(errors="replace").rstrip())
    stream.close()


_shared: Worker | None = None


def shared() -> Worker:
    """This tune process's timing worker (one per process, hence per GPU: `--workers N`
    runs N processes, one GPU each)."""
    global _shared
    if _shared is None:
        _shared = Worker()
        atexit.register(_shared.close)
    return _shared


def startup_seconds() -> float:
    """How long the shared worker's last start took (0 before it started)."""
    return _shared.startup_s if _shared is not None else 0.0


def evaluate(request: dict, timeout_s: float, deadline: float | None = None) -> dict:
    """Check and time one candidate in the shared worker (Worker.call says what comes back)."""
    return shared().call(request, timeout_s, deadline)


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    from .evaluate import handle

    faults = os.environ.get(TEST_FAULTS) == "1"
    protocol.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if faults and request.get("test_fault") == "exit":
            os._exit(1)
        if faults and request.get("test_fault") == "hang":
            time.sleep(3600)
        reply = dict(handle(request), pid=os.getpid())
        protocol.write(json.dumps(reply) + "\n")
        if reply.get("restart"):
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
