"""Run each kernel stage alone, each case in its own process, over a matrix of dtypes, head
dims, shapes and knob overrides; report per case: ok (with the relative error against the
reference), wrong, or crashed (with the last error line). A crash (an illegal memory
access poisons the CUDA context) costs only its own process.

    python bench/run.py probe-stages [--dtypes fp16,bf16,fp32] [--head-dims 16,32]
        [--stages fused,two_stage,backward] [--shapes 1,64,1;1,999,3]
        [--variants "solve.CHUNK=16;solve.num_warps=8"] [--jobs 8] [--sanitize]

A variant is a ';'-separated list of override sets; each set is ','-joined
section.KNOB=VALUE pairs applied to the built-in default ('' is the default itself).
--sanitize reruns the first crashed case under compute-sanitizer (memcheck).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys

import yaml

STAGES = ("fused", "two_stage", "backward")


def run_case(case: dict) -> dict:
    """In this process: one pass of dfgen under the case's config, checked."""
    import os

    import torch

    if not torch.cuda.is_available():  # the same pipeline in Triton's interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    from dfgen.kernels.config import KernelConfig, default_config
    from dfgen.settings import torch_dtype
    from dfgen.tools.check import check, passes, random_pass_inputs

    dtype = torch_dtype(case["dtype"])
    B, T, H = case["shape"]
    D = case["head_dim"]
    strategy = "two_stage" if case["stage"] == "two_stage" else "fused"
    config = default_config(D, dtype, strategy=strategy).to_dict()
    for name, value in case["overrides"].items():
        section, knob = name.split(".")
        config[section] = dict(config.get(section, {}), **{knob: value})
    config = KernelConfig.from_dict(config)
    backward = case["stage"] == "backward"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v, beta, do, _ = random_pass_inputs((B, T, H, D), dtype, device, seed=1)
    err, _ = check(config, backward, q, k, v, beta, do)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"ok": passes(err, dtype, backward), "error": err}


def _label(case) -> str:
    over = ",".join(f"{k}={v}" for k, v in case["overrides"].items()) or "default"
    return f"{case['stage']:9s} {case['dtype']} d{case['head_dim']:<3d} {tuple(case['shape'])} {over}"


def spawn(case: dict, timeout: float, prefix=()) -> dict:
    try:
        proc = subprocess.run([*prefix, sys.executable, __file__, "--one", json.dumps(case)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "hung", "detail": f"over {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1])
        return {"status": "ok" if result["ok"] else "WRONG", "detail": f"err {result['error']:.2e}",
                "log": proc.stdout[-4000:]}
    tail = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    return {"status": "CRASH", "detail": (tail[-1] if tail else "no output")[:200],
            "log": (proc.stdout + proc.stderr)[-6000:]}


def parse_variants(text: str) -> list[dict]:
    out = []
    for group in text.split(";"):
        overrides = {}
        for pair in filter(None, (p.strip() for p in group.split(","))):
            name, value = pair.split("=", 1)
            overrides[name.strip()] = yaml.safe_load(value)
        out.append(overrides)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--head-dims", default="16,32,64,128")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--shapes", default="1,64,1;1,999,3")
    parser.add_argument("--variants", default="")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--sanitize", action="store_true")
    parser.add_argument("--logs", help="folder for each crashed case's log")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(json.loads(args.one))))
        return 0
    cases = [dict(stage=stage, dtype=dtype, head_dim=int(d), shape=[int(x) for x in shape.split(",")],
                  overrides=over)
             for stage in args.stages.split(",") for dtype in args.dtypes.split(",")
             for d in args.head_dims.split(",") for shape in args.shapes.split(";")
             for over in parse_variants(args.variants)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: spawn(c, args.timeout), cases))
    crashed = None
    for i, (case, result) in enumerate(zip(cases, results)):
        print(f"{result['status']:5s} {_label(case)}  {result['detail']}", flush=True)
        if result["status"] != "ok" and args.logs:
            import os

            os.makedirs(args.logs, exist_ok=True)
            with open(os.path.join(args.logs, f"case{i}.log"), "w") as handle:
                handle.write(_label(case) + "\n" + result.get("log", ""))
        if result["status"] == "CRASH" and crashed is None:
            crashed = case
    bad = sum(r["status"] != "ok" for r in results)
    print(f"{len(results) - bad} ok, {bad} not ok")
    if args.sanitize and crashed is not None:
        print(f"compute-sanitizer memcheck on: {_label(crashed)}", flush=True)
        result = spawn(crashed, 600, prefix=("compute-sanitizer", "--tool", "memcheck",
                                             "--print-limit", "5"))
        print(result.get("log", "")[-5000:])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
