"""Time each stage of dfgen's forward and backward alone at the benchmark shapes, beside
torch SDPA's causal forward and forward+backward, in one process (GPU; bf16; fresh random
inputs; triton.testing.do_bench medians). Tells where the time of one training step goes.

"solve_fwd, no waits" runs the forward solve with every chunk's flag already set and u
already solved (from a first run): the same work without the wavefront's chain, so the
gap to "solve_fwd (o)" is what the sequential dependency costs (it includes one small
copy that sets the flags); nan where the config splits the prefix (SPLIT_PREFIX: its
partial sums cannot be pre-satisfied).

    python bench/run.py stages [--shapes "1,4096,16,128;8,1024,32,64"] [--config cfg.yaml]
"""
import argparse
import math

import torch
import triton

from dfgen.kernels import backward, build, forward
from dfgen.kernels.config import default_config
from dfgen.tools.arguments import load_configs, parse_shapes
from dfgen.tools.bench import GPU_SHAPES, sdpa_causal
from dfgen.tools.check import random_pass_inputs
from dfgen.tools.timing import timer


median_ms = timer(on_gpu=True)  # do_bench medians, as `dfgen bench` times


def _without_waits(q, k, v, beta, knobs):
    """A launch of the forward solve whose flags are all set and whose u is already the
    solution: every wait passes at once and each program rewrites the same u. None where
    that does not reproduce the output: a split prefix (SPLIT_PREFIX) waits on partial sums
    that each launch writes anew, so setting its flags ahead lets programs read them
    before they are written."""
    D = q.shape[3]
    module = build.load("solve_fwd", q.dtype, D, knobs)
    u, o, _, lse, sync = forward.solve_buffers(q, module, write_o=True)
    module.launch(q, k, v, beta, u, o, None, lse, sync, 1.0 / math.sqrt(D))  # solves u
    expected = o.clone()
    ready = torch.ones_like(sync)
    ready[0] = 0  # the ticket counter starts at zero

    def run():
        sync.copy_(ready)
        module.launch(q, k, v, beta, u, o, None, lse, sync, 1.0 / math.sqrt(D))
    run()
    return run if torch.equal(o, expected) else None


def stage_times(shape, dtype, config):
    B, T, H, D = shape
    q, k, v, beta, do, _ = random_pass_inputs(shape, dtype, "cuda", seed=0)
    cfg = (config or default_config(D, dtype)).with_defaults(default_config(D, dtype))
    o, u, lse, a, inv = forward.forward(q, k, v, beta, cfg, for_backward=True)
    dv, e, dbeta, delta, dsd = backward.reverse_sweep(q, k, do, u, a, beta, lse, cfg.solve_bwd, inv=inv)
    times = {
        "solve_fwd (o)": median_ms(lambda: forward.solve_stage(q, k, v, beta, cfg.solve, write_o=True)),
        "solve_fwd, no waits": median_ms(no_waits) if (no_waits := _without_waits(
            q, k, v, beta, cfg.solve)) else float("nan"),
        "solve_fwd (o, a)": median_ms(lambda: forward.forward(q, k, v, beta, cfg, for_backward=True)),
        "solve_bwd": median_ms(lambda: backward.reverse_sweep(q, k, do, u, a, beta, lse, cfg.solve_bwd,
                                                              inv=inv)),
        "attn_bwd": median_ms(lambda: backward.query_key_grads(q, k, u, e, lse, delta, dsd, cfg.attn_bwd)),
    }
    qs, ks, vs = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    do_s = do.transpose(1, 2).contiguous()
    times["SDPA fwd"] = median_ms(lambda: sdpa_causal(qs, ks, vs))

    def sdpa_step():
        sdpa_causal(qs, ks, vs).backward(do_s)
    times["SDPA fwd+bwd"] = median_ms(sdpa_step)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="'B,T,H,D;...' (default: the benchmark set)")
    ap.add_argument("--config", default=None, help="YAML file with one kernel config")
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes) if args.shapes else GPU_SHAPES
    config = load_configs(args.config)[0] if args.config else None
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, bf16, median ms")
    header = None
    for shape in shapes:
        times = stage_times(shape, torch.bfloat16, config)
        if header is None:
            header = list(times)
            print("| B, T, H, D | " + " | ".join(header) + " | fwd+bwd / SDPA |")
            print("|" + "---|" * (len(header) + 2))
        total = times["solve_fwd (o, a)"] + times["solve_bwd"] + times["attn_bwd"]
        print(f"| {', '.join(map(str, shape))} | " + " | ".join(f"{times[h]:.3f}" for h in header)
              + f" | {total / times['SDPA fwd+bwd']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
