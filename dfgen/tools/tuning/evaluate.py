"""What the tuner's worker process (worker.py) does with one request: check and time a
whole pass against the naive reference, check and time one stage alone, or only compile a
stage's kernels (compile_ahead.py's processes). Every reply is a dict; nothing raises.

Requests (the bucket's fields pass, dtype, head_dim, T, BH, variant, and a seed, in each):
  {"op": "pass", "config"}   the pass under `config` on fresh inputs (the seed fixes them):
                             o (and with fwd+bwd every gradient) must match the reference
                             within the dtype's tolerance, then the pass is timed
  {"op": "stage", "slot", "knobs", "forward"}
                             one stage (a slot: stages.SLOTS) under `knobs`, on inputs a real
                             forward under the `forward` config made at the bucket's shape
                             (for attn_fwd and attn_bwd: the stage before it under the default
                             knobs too); its outputs must match the same stage under the
                             default knobs within the dtype's tolerance, then it is timed
  {"op": "compile", ... as "stage"}
                             the same stage's kernels compiled, never launched (GPU only)
A decode bucket's requests (pass "decode") are of the one slot "decode": "stage" with
`knobs`, "pass" with `config` {decode: knobs}, both checked and timed alike (DecodeBench):
decoding steps at a small cache against the naive reference, then one step at the
bucket's shape against the default knobs' step there, then that step timed.
Replies: {"ok": true, "median_ms", "error", "first_s"} ("first_s": the first call, compiling
included), {"ok": false, "reason"}; "restart": true when the process's GPU context is lost
(after an illegal memory access): the worker then exits and is replaced.

A stage's inputs and its default outputs are made once per bucket, stage and forward
config, and kept while the requests are for that bucket (one bucket's tensors at a time).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

SLOTS = {  # slot: (template stage, forward strategy it belongs to; None for the backward)
    "solve_fwd(fused)": ("solve_fwd", "fused"),
    "solve_fwd(two_stage)": ("solve_fwd", "two_stage"),
    "attn_fwd": ("attn_fwd", "two_stage"),
    # a training pass's forward: the same kernel, also writing a (what the backward needs)
    "solve_fwd(fused, training)": ("solve_fwd", "fused"),
    "solve_fwd(two_stage, training)": ("solve_fwd", "two_stage"),
    "solve_bwd": ("solve_bwd", None),
    "attn_bwd": ("attn_bwd", None),
    # a decoding step, both of its launches (a decode bucket's one slot)
    "decode": ("decode", None),
}
DECODE_SLOT = "decode"
TRAINING_SLOTS = {"fused": "solve_fwd(fused, training)", "two_stage": "solve_fwd(two_stage, training)"}
WARM_SHAPE = (1, 512, 2)  # (B, T, H): a pass compiles here first, outside the GPU lock

_benches: dict = {}  # (bucket, seed) -> {(slot, forward, compile only): StageBench}


@contextlib.contextmanager
def gpu_lock():
    """An exclusive lock per visible GPU set, held while a candidate is checked and timed
    (tune processes sharing a GPU take turns)."""
    name = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "-") or "none"
    from filelock import FileLock

    with FileLock(os.path.join(tempfile.gettempdir(), f"dfgen-gpu-{name}.lock")):
        yield


def handle(request: dict) -> dict:
    """The reply to one request; failures of the candidate are replies, not exceptions."""
    import torch

    op = request.get("op", "pass")
    try:
        if request.get("pass") == "decode" and op == "pass":  # the same check and timing as a trial
            return evaluate_stage(dict(request, slot=DECODE_SLOT,
                                       knobs=request["config"].get("decode", {})))
        if op == "pass":
            return evaluate_pass(request)
        if op == "stage":
            return evaluate_stage(request)
        if op == "compile":
            return compile_stage(request)
        return {"ok": False, "reason": f"unknown op {op!r}"}
    except Exception as exc:  # compile errors, out of resources: reported, not raised
        reply = {"ok": False, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
        if torch.cuda.is_available():
            try:
                torch.cuda.synchronize()
            except Exception:  # an illegal access leaves the context unusable
                reply["restart"] = True
        return reply


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_pass(request: dict) -> dict:
    import torch

    from ...kernels.config import KernelConfig
    from ...settings import torch_dtype
    from ..check import check, passes, random_pass_inputs, runner
    from ..timing import timer

    device = _device()
    on_gpu = device.type == "cuda"
    dtype = torch_dtype(request["dtype"])
    backward = request["pass"] == "fwd+bwd"
    config = KernelConfig.from_dict(request["config"])
    shape = (1, request["T"], request["BH"], request["head_dim"])
    with_q_solve = request.get("variant") == "qsolve"
    if on_gpu:  # compile outside the lock: other tune processes may be timing meanwhile
        warm = random_pass_inputs(WARM_SHAPE + (request["head_dim"],), dtype, device,
                                  request["seed"] + 1, with_q_solve)
        runner(*warm[:4], config, backward, warm[4], warm[5])[1]()
        torch.cuda.synchronize()
        del warm
    with gpu_lock() if on_gpu else contextlib.nullcontext():
        q, k, v, beta, do, q_solve = random_pass_inputs(shape, dtype, device, request["seed"],
                                                        with_q_solve)
        err, run = check(config, backward, q, k, v, beta, do, q_solve=q_solve)
        if not passes(err, dtype, backward):  # NaN fails too
            return {"ok": False, "reason": f"wrong: relative error {err:.3e}"}
        if on_gpu:
            torch.cuda.empty_cache()  # the reference's memory, before timing
        median = timer(on_gpu)(run)
    return {"ok": True, "median_ms": median, "error": err}


def evaluate_stage(request: dict) -> dict:
    import torch

    from ...kernels.spec import spec
    from ..timing import timer

    bench = stage_bench(request)
    knobs = bench.knobs(request["knobs"])
    spec(bench.stage).check(knobs, bench.kernel_head_dim)
    on_gpu = bench.device.type == "cuda"
    with gpu_lock() if on_gpu else contextlib.nullcontext():
        wrong = bench.reference_failure(knobs)
        if wrong is not None:
            return {"ok": False, "reason": wrong}
        started = time.perf_counter()
        outputs = bench.run(knobs)
        if on_gpu:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - started
        err = bench.error(outputs)
        if not err <= bench.tolerance:  # NaN fails too
            return {"ok": False, "reason": f"wrong: relative error {err:.3e} against the "
                    f"default knobs' {bench.stage} output", "first_s": first_s}
        del outputs
        median = timer(on_gpu)(lambda: bench.run(knobs))
    return {"ok": True, "median_ms": median, "error": err, "first_s": first_s}


def compile_stage(request: dict) -> dict:
    """Compile a stage candidate's kernels into Triton's on-disk cache without launching
    them: its inputs are made as for timing (same shapes, strides and alignment, hence
    the same specialization and cache key) with every Triton launch turned into a compile."""
    from ...kernels.spec import spec

    if _device().type != "cuda":
        return {"ok": True, "skipped": "the interpreter compiles nothing"}
    spec(SLOTS[request["slot"]][0]).check(request["knobs"], request["head_dim"])
    started = time.perf_counter()
    with no_launch():
        stage_bench(request, compile_only=True).run(request["knobs"])
    return {"ok": True, "seconds": time.perf_counter() - started}


@contextlib.contextmanager
def no_launch():
    """Inside: a launch of any Triton kernel (`kernel[grid](...)`) compiles it for the
    current device, as a launch would, and stops there (Triton's warmup path)."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = compile_only
    try:
        yield
    finally:
        JITFunction.run = original


def stage_bench(request: dict, compile_only: bool = False) -> "StageBench":
    """The StageBench of a request (made on first use; other buckets' are dropped)."""
    bucket = json.dumps({k: request.get(k) for k in ("pass", "dtype", "head_dim", "T", "BH",
                                                     "variant", "seed")}, sort_keys=True)
    if bucket not in _benches:
        _benches.clear()
        _benches[bucket] = {}
    key = (request["slot"], json.dumps(request.get("forward"), sort_keys=True), compile_only)
    benches = _benches[bucket]
    if key not in benches:
        make = DecodeBench if request["slot"] == DECODE_SLOT else StageBench
        benches[key] = make(request, _device(), compile_only)
    return benches[key]


class StageBench:
    """One stage (a slot) at a bucket's shape: its inputs, `run(knobs)` returning the
    stage's outputs, and `error(outputs)`: their largest relative error against the
    outputs under the default knobs."""

    def __init__(self, request: dict, device, compile_only: bool = False):
        from ...kernels import backward as bwd
        from ...kernels import forward as fwd
        from ...kernels.config import KernelConfig, default_config
        from ...settings import torch_dtype
        from ..check import GRAD_TOLERANCE, TOLERANCE, random_pass_inputs

        self.stage, self.strategy = SLOTS[request["slot"]]
        self.device = device
        self.dtype = dtype = torch_dtype(request["dtype"])
        head_dim, qsolve = request["head_dim"], request.get("variant") == "qsolve"
        self.kernel_head_dim = head_dim  # (16-bit head dim 16 is padded before the kernels)
        self.tolerance = (GRAD_TOLERANCE if self.strategy is None else TOLERANCE)[dtype]
        shape = (1, request["T"], request["BH"], head_dim)
        q, k, v, beta, do, q_solve = random_pass_inputs(shape, dtype, device, request["seed"], qsolve)
        qs = q_solve if qsolve else q  # the solve stage's queries
        default = default_config(head_dim, dtype, self.strategy or "fused")
        forward = KernelConfig.from_dict(
            request.get("forward") or {"strategy": "two_stage" if qsolve else "fused"},
            defaults=default_config(head_dim, dtype, "two_stage" if qsolve else "fused"))
        self.default_knobs = dict(getattr(default, {"solve_fwd": "solve", "attn_fwd": "attn"}.get(
            self.stage, self.stage)))
        if self.stage == "solve_fwd":
            fused = self.strategy == "fused"
            training = request["slot"] in TRAINING_SLOTS.values()

            def run(knobs):  # (u, o or None, lse, a or None); training also keeps the inverses
                inv = fwd.kept_inverses(qs, knobs["CHUNK"]) if training else None
                return fwd.solve_stage(qs, k, v, beta, knobs, write_o=fused, write_a=training, inv=inv)
        elif self.stage == "attn_fwd":
            u = fwd.solve_stage(qs, k, v, beta, default.solve, write_o=False)[0]

            def run(knobs):
                return (fwd.attention_stage(q, k, u, knobs),)
        elif not qsolve:
            _, u, lse, a, inv = fwd.forward(q, k, v, beta, forward, for_backward=True)
            if self.stage == "solve_bwd":  # the forward's inverses read where the CHUNKs agree
                def run(knobs):
                    return bwd.reverse_sweep(q, k, do, u, a, beta, lse, knobs, inv=inv)
            else:
                _, e, _, delta, ds_diag = bwd.reverse_sweep(q, k, do, u, a, beta, lse,
                                                            default.solve_bwd, inv=inv)

                def run(knobs):
                    return bwd.query_key_grads(q, k, u, e, lse, delta, ds_diag, knobs)
        else:  # the q_solve backward: the attention stage's grads, then the solve stage's
            o, u, lse_solve, a, lse_attn, inv = fwd.forward_q_solve(q, q_solve, k, v, beta, forward,
                                                                    for_backward=True)
            du = bwd.attention_stage_grads(q, k, u, o, lse_attn, do, default.attn_bwd)[2]
            if self.stage == "solve_bwd":
                def run(knobs):
                    return bwd.reverse_sweep(q_solve, k, du, u, a, beta, lse_solve, knobs,
                                             gated=False, inv=inv)
            else:
                _, e, _, delta, ds_diag = bwd.reverse_sweep(q_solve, k, du, u, a, beta, lse_solve,
                                                            default.solve_bwd, gated=False, inv=inv)

                def run(knobs):
                    return (bwd.attention_stage_grads(q, k, u, o, lse_attn, do, knobs)
                            + bwd.query_key_grads(q_solve, k, u, e, lse_solve, delta, ds_diag, knobs))
        self.run = run
        self.reference = None if compile_only else self.run(self.default_knobs)

    def knobs(self, given) -> dict:
        """The knobs a request's candidate runs under (a stage's are given whole)."""
        return given

    def reference_failure(self, knobs) -> str | None:
        """Why the candidate fails before its outputs are compared (a stage: never; its
        reference is the stage under the default knobs, whose pass the tuner checked)."""
        return None

    def error(self, outputs) -> float:
        from ..check import relative_error

        return max(relative_error(out, ref) for out, ref in zip(outputs, self.reference)
                   if out is not None)


class DecodeBench(StageBench):
    """A decode bucket's step: a cache of T - 1 random tokens (k, and u as the prefill
    would have solved them: fresh N(0, 1), never zeros) for B*H = BH (B = max(1, BH // 16),
    H = BH // B), and one new token per row. `run(knobs)` is one decoding step (both
    launches); the row lengths stay as they are (the step writes the new lengths into a
    spare buffer), so repeated runs overwrite the same cache rows and time the same step.
    Its outputs (o and the u it appends) are compared with the step under the default
    knobs; before that, `reference_failure` runs decoding steps under the knobs at a small
    cache against the naive reference (check.decode_check: the whole sequence recomputed),
    which is the check a default's step may not stand in for: a candidate could split
    the cache differently and still agree with nothing."""

    def __init__(self, request: dict, device, compile_only: bool = False):
        from ...kernels.decode import decode_step, default_decode_knobs
        from ...kernels.padding import kernel_head_dim
        from ...settings import torch_dtype
        from ..check import DECODE_TOLERANCE, decode_shape, random_inputs

        self.stage, self.strategy = DECODE_SLOT, None
        self.device = device
        self.dtype = dtype = torch_dtype(request["dtype"])
        self.head_dim = D = request["head_dim"]
        self.kernel_head_dim = kernel_head_dim(D, dtype)
        self.tolerance = DECODE_TOLERANCE[dtype]
        self.seed = request["seed"]
        self.default_knobs = default_decode_knobs(D, dtype)
        B, H = decode_shape(request["BH"])
        self.shape = B, H
        length = max(1, request["T"] - 1)
        cache_k, cache_u, _, _ = random_inputs((B, length + 1, H, D), dtype, device, self.seed)
        q, k, v, beta = random_inputs((B, 1, H, D), dtype, device, self.seed + 1)
        lengths = _row_lengths(B, length, device)
        spare = _row_lengths(B, length, device)

        def run(knobs):
            o = decode_step(q, k, v, beta, cache_k, cache_u, lengths, spare, length, knobs)
            return o, cache_u[:, length]

        self.run = run
        self.reference = None if compile_only else tuple(t.clone() for t in run(self.default_knobs))

    def knobs(self, given) -> dict:
        """A candidate's knobs over the default's (a tuned entry may leave some out)."""
        return {**self.default_knobs, **dict(given)}

    def reference_failure(self, knobs) -> str | None:
        from ..check import DECODE_STEPS, decode_check, decode_shape

        on_gpu = self.device.type == "cuda"
        length = (1024 if on_gpu else 48) - sum(DECODE_STEPS)
        B, H = decode_shape(min(self.shape[0] * self.shape[1], 16 if on_gpu else 2))
        err = decode_check(knobs, self.dtype, self.device, length, B, H, self.head_dim,
                           seed=self.seed + 2)
        if not err <= self.tolerance:  # NaN fails too
            return (f"wrong: relative error {err:.3e} against the reference (decoding steps "
                    f"after a cache of {length} tokens)")
        return None


def _row_lengths(B: int, value: int, device):
    """An int32 [B] tensor of `value` (a cache's row lengths)."""
    import torch

    return torch.full((B,), value, dtype=torch.int32, device=device)
