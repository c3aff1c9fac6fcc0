"""Check and time one candidate config in its own process (`python -m dfgen.tools.tuning.evaluate`),
so that a crash, a hang or an out-of-resources error costs only this process.

Reads a JSON request on stdin: {config, pass, dtype, head_dim, T, BH, seed, variant}; prints one
JSON line: {"ok": true, "median_ms", "error"} or {"ok": false, "reason"}. Inputs are fresh
random tensors, every one of them fixed by the request's seed (a failed check can be
rerun as it was); the output (and with fwd+bwd every gradient) must match the naive
reference within the dtype's tolerance before any time is taken.

On a GPU, several evaluations run at once (`dfgen tune --jobs`): each first compiles its
kernels by running the pass at a small shape, which needs the CPU and little of the GPU,
then takes the GPU's lock for the check at the tuned shape and the timing, so that no two
candidates are ever timed at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile

WARM_SHAPE = (1, 512, 2)  # (B, T, H): T / CHUNK > 1 and H > 1, as at the tuned shapes


@contextlib.contextmanager
def gpu_lock():
    """An exclusive lock per visible GPU set, held while a candidate is checked and timed."""
    name = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "-") or "none"
    from filelock import FileLock

    with FileLock(os.path.join(tempfile.gettempdir(), f"dfgen-gpu-{name}.lock")):
        yield


def main() -> int:
    request = json.loads(sys.stdin.read())
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    from ...kernels.config import KernelConfig
    from ...settings import torch_dtype
    from ..check import check, passes, random_pass_inputs, runner
    from ..timing import timer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(request["dtype"])
    backward = request["pass"] == "fwd+bwd"
    config = KernelConfig.from_dict(request["config"])
    shape = (1, request["T"], request["BH"], request["head_dim"])
    with_q_solve = request.get("variant") == "qsolve"
    on_gpu = device.type == "cuda"
    try:
        if on_gpu:  # compile outside the lock: other candidates may be timed meanwhile
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
                print(json.dumps({"ok": False, "reason": f"wrong: relative error {err:.3e}"}))
                return 0
            if on_gpu:
                torch.cuda.empty_cache()  # the reference's memory, before timing
            median = timer(on_gpu)(run)
    except Exception as exc:  # compile errors, out of resources: reported, not raised
        print(json.dumps({"ok": False, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}))
        return 0
    print(json.dumps({"ok": True, "median_ms": median, "error": err}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
