"""Time the forward solve (fused output) under knob variants at the
benchmark shapes, beside torch SDPA's causal forward, in one process (GPU; bf16; fresh
random inputs; triton.testing.do_bench medians). Each variant's output is compared with
the first variant's (same inputs) before its time is reported.

A variant is `name: knob=value,...` over the built-in default's solve knobs.
`--module d128=FILE` adds a rendered solve_fwd source (`dfgen emit` output, e.g. from an
older checkout of the templates) as a last column for the shapes of that head dim, run
at its own knobs: an A/B of template versions in one process.

    python bench/run.py variants [d128|d64] [--shapes "1,4096,16,128;..."] [--variants "a: ;b: maxnreg=168"] \
        [--module d128=old_d128.py]
"""
import argparse
import importlib.util
import math
import os
import sys

import torch
import triton
import yaml

from dfgen.kernels import build, forward
from dfgen.kernels.config import default_config
from dfgen.tools.arguments import parse_shapes
from dfgen.tools.bench import GPU_SHAPES, sdpa_causal
from dfgen.tools.check import random_inputs
from dfgen.tools.timing import timer


median_ms = timer(on_gpu=True)  # do_bench medians, as `dfgen bench` times


def parse_variant(text):
    """'name: KNOB=value,...' -> (name, {KNOB: value}), values read as YAML scalars."""
    name, _, body = text.partition(":")
    pairs = (item.split("=", 1) for item in body.split(",") if item.strip())
    return name.strip(), {key.strip(): yaml.safe_load(value) for key, value in pairs}


def load_file(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runner(module, q, k, v, beta):
    """(run, o): run() is one launch of the module's forward solve (flags zeroed first)."""
    u, o, _, lse, sync = forward.solve_buffers(q, module, write_o=True)

    def run():
        sync.zero_()
        module.launch(q, k, v, beta, u, o, None, lse, sync, 1.0 / math.sqrt(q.shape[3]))
    return run, o


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--variants", default="default:", help="';'-separated 'name: knob=value,...'")
    ap.add_argument("--module", action="append", default=[], help="rendered solve_fwd file(s), by head dim: d128=path")
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes) if args.shapes else GPU_SHAPES
    variants = [parse_variant(v) for v in args.variants.split(";") if v.strip()]
    files = dict(m.split("=", 1) for m in args.module)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bf16, median ms of the forward solve (fused output); ratio to SDPA's causal forward")
    names = [n for n, _ in variants] + (["file"] if files else [])
    print("| B, T, H, D | SDPA | " + " | ".join(names) + " |")
    print("|" + "---|" * (len(names) + 2))
    for shape in shapes:
        B, T, H, D = shape
        q, k, v, beta = random_inputs(shape, torch.bfloat16, "cuda")
        qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        sdpa = median_ms(lambda: sdpa_causal(qs, ks, vs))
        cells, ref = [], None
        todo = [(n, kv) for n, kv in variants] + ([("file", None)] if files else [])
        for name, over in todo:
            try:
                if over is None:
                    if f"d{D}" not in files:
                        cells.append("-")
                        continue
                    module = load_file(files[f"d{D}"])
                else:
                    knobs = dict(default_config(D, torch.bfloat16).solve, **over)
                    module = build.load("solve_fwd", torch.bfloat16, D, knobs)
                run, o = runner(module, q, k, v, beta)
                run()
                torch.cuda.synchronize()
                if ref is None:
                    ref = o.float().clone()
                err = ((o.float() - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    cells.append(f"WRONG {err:.1e}")
                    continue
                ms = median_ms(run)
                cells.append(f"{ms:.3f} ({ms / sdpa:.2f}x)")
            except Exception as exc:  # report and go on
                cells.append(f"{type(exc).__name__}")
                print(f"  {name} at {shape}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        print(f"| {', '.join(map(str, shape))} | {sdpa:.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
