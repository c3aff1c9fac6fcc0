"""Compile every generated kernel for a GPU target without a GPU (Triton's AOT path) and
report registers and spills from ptxas: catches compile errors before a GPU session.

    python bench/run.py compile-check [--arch 90] [--stages solve_fwd,solve_bwd] [--head-dims 128]
                                  [--switches HAS_BETA=1,WRITE_O=1,VARLEN=0]

Uses the ptxas that ships in the triton wheel (the newest one that reads triton's PTX).
The triton here may differ from the GPU machine's: a pass here is a good sign, not proof.
"""
import argparse
import itertools
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dfgen.kernels import build
from dfgen.kernels.launcher import unwrap
from dfgen.kernels.config import default_config
from dfgen.kernels.decode import default_decode_knobs
from dfgen.kernels.spec import spec

FP32_POINTERS = {"LSE", "DELTA", "DSD", "DBETA", "BETA", "DU", "PART", "PM", "PL", "PACC"}
INT_POINTERS = {"SYNC", "CU", "LEN", "LEN_OUT"}
FIXED = {"TRACE": False, "PTX_WAIT": True}  # constexprs compiled at one value (TRACE: a GPU-only timing aid; PTX_WAIT: what a GPU runs)
UNALIGNED = {"T", "H", "GROUP", "n_bh", "n_chunks", "sm_scale", "n_new", "capacity", "split_len", "n_splits"}
# knob settings that take other code paths, compiled besides each stage's default (at every
# switch on, to keep CI's time down; the default compiles at every switch setting)
VARIANTS = {"solve_fwd": ({}, {"SPLIT_PREFIX": True}, {"SPLIT_PREFIX": False}, {"POLL": "relaxed"}, {"BLOCK_N": 128, "SOLVE_PRECISION": "fp16"},
                          {"SPLIT_PREFIX": True, "SPLIT_AT": 75}),
            "attn_bwd": ({}, {"ONE_LAUNCH": True})}


def signature(fn, dtype, constexprs):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("T", "H", "GROUP"):
            sig[name] = "i32"
        elif name in INT_POINTERS:
            sig[name] = "*i32"
        elif name == "TRACE_BUF":
            sig[name] = "*i64"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name == "INV":  # the kept in-chunk inverses: float16 for 16-bit inputs
            sig[name] = "*fp32" if dtype == "fp32" else "*fp16"
        elif name.isupper() or name in ("DV", "DK"):
            sig[name] = f"*{dtype}"
        elif name == "sm_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if name not in UNALIGNED and name not in constexprs and not name.startswith("stride_bet") \
                and not name.startswith("stride_db"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ptxas_report(ptx, arch):
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for exe in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bindir, exe)
        if not os.path.exists(path):
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        out = subprocess.run([path, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        os.unlink(f.name)
        if out.returncode == 0:
            regs = [l for l in out.stderr.splitlines() if "registers" in l or "spill" in l]
            return " | ".join(l.split("info    :")[-1].strip() for l in regs)
    return "ptxas unavailable"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--stages", default="solve_fwd,attn_fwd,solve_bwd,attn_bwd,decode",
                    help="comma-separated stages to compile")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--switches", default="",
                    help="pin kernel switches, e.g. HAS_BETA=1,VARLEN=0 (others: both values)")
    args = ap.parse_args()
    wanted = set(args.stages.split(","))
    pinned = {k: bool(int(v)) for k, v in (kv.split("=") for kv in args.switches.split(",") if kv)}
    target = GPUTarget("cuda", args.arch, 128)
    failures = 0
    head_dims = [int(x) for x in args.head_dims.split(",")]
    for head_dim, dtype in itertools.product(head_dims, ("bf16",)):
        cfg = default_config(head_dim, torch.bfloat16, strategy="two_stage")
        stages = {"solve_fwd": cfg.solve, "attn_fwd": cfg.attn, "solve_bwd": cfg.solve_bwd,
                  "attn_bwd": cfg.attn_bwd, "decode": default_decode_knobs(head_dim, torch.bfloat16)}
        switches = {"solve_fwd": ("HAS_BETA", "WRITE_O", "WRITE_A", "WRITE_INV", "VARLEN"),
                    "attn_fwd": ("WRITE_LSE", "VARLEN"),
                    "solve_bwd": ("HAS_BETA", "GATED", "VARLEN", "LOAD_INV"),
                    "attn_bwd": ("WRITE_DU", "VARLEN"),
                    "decode": ("HAS_BETA", "WRITE_LSE", "Q_SOLVE")}
        variants = [(stage, {**knobs, **extra}, not extra) for stage, knobs in stages.items()
                    if stage in wanted for extra in VARIANTS.get(stage, ({},))
                    if all(k in spec(stage).knobs for k in extra)
                    if not extra or any(knobs.get(k) != v for k, v in extra.items())]
        for stage, knobs, every_switch in variants:
            try:
                module = build.load(stage, torch.bfloat16, head_dim, knobs)
            except Exception as exc:  # a variant the templates' constraints reject at this head dim
                print(f"skip {stage} d{head_dim} {knobs}: {str(exc).splitlines()[0][:160]}")
                continue
            kernels = [unwrap(getattr(module, n)) for n in dir(module) if n.endswith("_kernel")]
            for fn in kernels:
                present = [s for s in switches[stage] if s in fn.arg_names]
                for values in itertools.product(*[(False, True) if every_switch else (True,)] * len(present)):
                    consts = dict(zip(present, values))
                    if any(consts.get(k, v) != v for k, v in pinned.items()):
                        continue
                    consts.update({k: pinned.get(k, v) for k, v in FIXED.items() if k in fn.arg_names})
                    if "D_REAL" in fn.arg_names:  # the decode kernels' real head dim (here: all of it)
                        consts["D_REAL"] = head_dim
                    sig, attrs = signature(fn, dtype, consts)
                    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v
                                                         for k, v in consts.items()}, attrs=attrs)
                    label = f"{module.__name__.rsplit('.', 1)[-1]} " + " ".join(f"{k}={int(v)}" for k, v in consts.items())
                    launch = getattr(module, "KERNEL_LAUNCH", {}).get(fn.__name__, module.LAUNCH)
                    try:
                        compiled = triton.compile(src, target=target, options=dict(
                            num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
                        print(f"ok   {label}: {ptxas_report(compiled.asm['ptx'], args.arch)}", flush=True)
                    except Exception as exc:  # report every failure, then exit non-zero
                        failures += 1
                        print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                              flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
