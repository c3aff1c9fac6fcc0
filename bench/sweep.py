"""Developer sweep on a GPU: time several forward configs per shape next to torch SDPA,
checking each config's output against the float32 naive reference first.

    python bench/sweep.py --shapes "1,4096,16,128;4,2048,16,64" --configs bench/configs.yaml

configs.yaml is a list of forward configs (dfgen.config.ForwardConfig dicts). A config
that fails to compile or run is reported and skipped. Prints one table per shape.
"""
import argparse
import sys
import traceback

import torch
import triton.testing
import yaml

from dfgen.bench import attention_flops, random_inputs, sdpa_causal
from dfgen.config import ForwardConfig
from dfgen.forward import forward
from dfgen.naive import naive_deltaformer_attn


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--configs", required=True)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--no-ref", action="store_true")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    configs = [ForwardConfig.from_dict(c) for c in yaml.safe_load(open(args.configs))]
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    dev = torch.device("cuda")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for shape in shapes:
        q, k, v, beta = random_inputs(shape, dtype, dev, seed=1)
        ref = None if args.no_ref else naive_deltaformer_attn(q, k, v, beta, torch.float32)
        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        sdpa = bench(lambda: sdpa_causal(qh, kh, vh))
        print(f"\n## {shape} {args.dtype}: SDPA {sdpa:.3f} ms", flush=True)
        for cfg in configs:
            try:
                cfg.check(shape[3])
                with torch.no_grad():
                    o, _, _ = forward(q, k, v, beta, cfg)
                    torch.cuda.synchronize()
                    err = rel(o, ref) if ref is not None else float("nan")
                    ms = bench(lambda: forward(q, k, v, beta, cfg))
                tf = attention_flops(*shape) / ms / 1e9
                print(f"{ms:8.3f} ms {ms / sdpa:6.2f}x  {tf:6.1f} TF/s err {err:.2e}  {cfg}", flush=True)
            except Exception as e:  # report and go on
                print(f"   FAILED {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        del ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
