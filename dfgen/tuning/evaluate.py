"""Check and time one candidate config in its own process (`python -m dfgen.tuning.evaluate`),
so that a crash, a hang or an out-of-resources error costs only this process.

Reads a JSON request on stdin: {config, pass, dtype, head_dim, T, BH, seed, variant}; prints one
JSON line: {"ok": true, "median_ms", "error"} or {"ok": false, "reason"}. Inputs are fresh
random tensors; the output (and with fwd+bwd every gradient) must match the naive
reference within the dtype's tolerance before any time is taken.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    request = json.loads(sys.stdin.read())
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    from ..bench import timer
    from ..config import KernelConfig
    from ..validation import check, passes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[request["dtype"]]
    backward = request["pass"] == "fwd+bwd"
    config = KernelConfig.from_dict(request["config"])
    gen = torch.Generator(device=device).manual_seed(request["seed"])
    shape = (1, request["T"], request["BH"], request["head_dim"])
    q, k, v, do = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(4))
    beta = torch.sigmoid(torch.randn(shape[:3], generator=gen, device=device))
    q_solve = (torch.randn(shape, generator=gen, device=device).to(dtype)
               if request.get("variant") == "qsolve" else None)
    try:
        err, run = check(config, backward, q, k, v, beta, do, q_solve=q_solve)
        if not passes(err, dtype, backward):  # NaN fails too
            print(json.dumps({"ok": False, "reason": f"wrong: relative error {err:.3e}"}))
            return 0
        median = timer(device.type == "cuda")(run)
    except Exception as exc:  # compile errors, out of resources: reported, not raised
        print(json.dumps({"ok": False, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}))
        return 0
    print(json.dumps({"ok": True, "median_ms": median, "error": err}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
