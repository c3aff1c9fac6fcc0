"""Where a wavefront step of the forward solve goes (GPU only): runs solve_fwd with its
TRACE timestamps (the GPU's global timer, ns, at fixed points of every program) and
reports, per step of one head's chain, medians over the heads and chunks:

  step    release of chunk c - release of chunk c-1 (the critical path's unit)
  wake    c sees c-1's flag - c-1 released          (flag propagation and polling)
  post    c released - c saw the flag               (work after the wait, store, release)
  late    c ready to wait - c-1 released            (> 0: c arrived after its predecessor)
  window  c ready to wait - c's prefix done         (tail scores, inverse, far product)
  prefix  c's prefix done - c started

    python bench/run.py step-trace [--shapes "1,4096,16,128;8,1024,32,64"] [--config cfg.yaml]
"""
import argparse
import math
import sys

import torch

from dfgen.kernels import build, forward
from dfgen.kernels.config import default_config
from dfgen.tools.arguments import load_configs, parse_shapes
from dfgen.tools.check import random_inputs

START, PREFIX, INVERSE, READY, WOKE, RELEASED, DONE, SM = range(8)


def traced_run(shape, dtype, knobs):
    B, T, H, D = shape
    q, k, v, beta = random_inputs(shape, dtype, "cuda", seed=0)
    module = build.load("solve_fwd", dtype, D, knobs)
    n_chunks = -(-T // module.CHUNK_ROWS)
    programs = B * H * n_chunks
    for _ in range(3):  # compile, warm up, then keep the last run's stamps
        trace = torch.full((programs, 8), -1, dtype=torch.int64, device="cuda")
        u, o, _, lse, sync = forward.solve_buffers(q, module, write_o=True)
        module.launch(q, k, v, beta, u, o, None, lse, sync, 1.0 / math.sqrt(D), trace=trace)
    torch.cuda.synchronize()
    return trace.cpu(), B * H, n_chunks


def step_stats(trace, n_bh, n_chunks, first_chunk):
    """Per-step intervals (µs) of every head's chain from first_chunk on."""
    t = trace.view(n_chunks, n_bh, 8).double() / 1000.0  # tickets are chunk-major
    cur, prev = t[first_chunk:], t[first_chunk - 1:-1]
    return {
        "step": cur[..., RELEASED] - prev[..., RELEASED],
        "wake": cur[..., WOKE] - prev[..., RELEASED],
        "post": cur[..., RELEASED] - cur[..., WOKE],
        "late": cur[..., READY] - prev[..., RELEASED],
        "window": cur[..., READY] - cur[..., PREFIX],
        "prefix": cur[..., PREFIX] - cur[..., START],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1,4096,16,128;8,1024,32,64;1,16384,8,128")
    ap.add_argument("--config", default=None, help="YAML file with one kernel config or a list (each traced)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("step-trace reads the GPU's timer: it needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          "µs, medians over heads and chunks (mean in brackets); late > 0 share: chunks that "
          "became ready to wait only after their predecessor released")
    print("| B, T, H, D | config | steps | kernel µs | step | wake | post | late | late > 0 | window | prefix |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    configs = load_configs(args.config) if args.config else [None]
    for shape in parse_shapes(args.shapes):
        for given in configs:
            config = default_config(shape[3], torch.bfloat16)
            if given is not None:
                config = given.with_defaults(config)
            trace, n_bh, n_chunks = traced_run(shape, torch.bfloat16, config.solve)
            assert (trace[:, :7] >= 0).all(), "a program left a stamp unwritten"
            span = (trace[:, DONE].max() - trace[:, START].min()).item() / 1000.0
            first = min(n_chunks - 1, config.solve["LOOKAHEAD"] + 1)
            stats = step_stats(trace, n_bh, n_chunks, first)
            cells = [f"{v.median().item():.2f} ({v.mean().item():.2f})" for v in stats.values()]
            late_share = (stats["late"] > 0).double().mean().item()
            cells.insert(4, f"{late_share:.0%}")
            print(f"| {', '.join(map(str, shape))} | {config} | {n_chunks} | {span:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
