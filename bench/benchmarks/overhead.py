"""Host time per eager call of dfgen.runtime.deltaformer_attn, beside torch SDPA's in the
same run (issue 17's measure: a tiny shape, where the GPU work is a few microseconds and
the call's time is the host's).

    python bench/run.py overhead [--shape 1,256,4,64]

Measures (median over bursts of calls, each burst after a synchronize, untimed, so that a
full GPU queue cannot stall the timed calls; dfgen's and SDPA's bursts of a row alternate,
as the host's own speed drifts by up to 2x between runs and within one):
  dispatch   input checks + tuned-config lookup + config check (anywhere);
  on a GPU also, at the tiny shape, each as wall time per call and as the process's CPU
  time per call (autograd's backward thread included):
  forward            deltaformer_attn under no_grad   | SDPA's causal forward
  decode step        deltaformer_decode of one token after a prefill of T | SDPA of one query
  forward+backward   o = deltaformer_attn(...); o.backward(do) | the same with SDPA
  (engine here)      the same with autograd's engine on the calling thread (no handoff to
                     its device thread, where dfgen's Python backward needs the GIL)
  launch     the forward's kernels launched directly (preallocated outputs, no dfgen Python)
  stubbed    the forward with the Triton launch replaced by a no-op: dfgen's own CPU time
"""
import argparse
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from dfgen.api.inputs import check_inputs
from dfgen.api.resolve import resolve_config
from dfgen.kernels.config import KernelConfig
from dfgen.runtime import deltaformer_attn
from dfgen.tools.arguments import parse_shapes
from dfgen.tools.bench import sdpa_causal
from dfgen.tools.check import random_inputs


def interleaved_us(fns, n=2000, sync=None, reps=7):
    """[(wall us, CPU us) per call] of each of `fns`: medians over `reps` rounds, each round
    one burst of n calls of every fn in turn; `sync` (untimed) runs before each burst."""
    for fn in fns:
        fn()
    walls, cpus = [[] for _ in fns], [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if sync:
                sync()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            if sync:
                sync()  # the burst's GPU work finishes inside its wall time
            walls[i].append((time.perf_counter() - wall) / n * 1e6)
            cpus[i].append((time.process_time() - cpu) / n * 1e6)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(walls, cpus)]


def per_call_us(fn, n=2000, sync=None, reps=7):
    """(wall us, CPU us) per call of one fn (interleaved_us)."""
    return interleaved_us([fn], n, sync, reps)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1,256,4,64", help="B,T,H,D of the tiny call (bf16)")
    ap.add_argument("--compiled", action="store_true", help="also both calls under "
                    "torch.compile(mode='reduce-overhead', fullgraph=True): CUDA graphs, no host "
                    "work per kernel")
    args = ap.parse_args()
    shape = parse_shapes(args.shape)[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v, beta = random_inputs(shape, torch.bfloat16, device, seed=0)

    def dispatch():
        check_inputs(q, k, v, beta)
        resolve_config(None, q, False)

    print(f"dispatch: {per_call_us(dispatch)[1]:.2f} us CPU per call (input checks + lookup + "
          "config check)")
    given = KernelConfig("fused", dict(resolve_config(None, q, False).solve))

    def dispatch_given():
        check_inputs(q, k, v, beta)
        resolve_config(given, q, False)

    print(f"dispatch with a config passed: {per_call_us(dispatch_given)[1]:.2f} us CPU per call")
    if device.type != "cuda":
        print("no GPU: the per-call host times beside SDPA need one; dfgen's host Python with "
              "every kernel stubbed (interpreter modules, CPU tensors: the input checks are not "
              "cached here, as they are for CUDA inputs):")
        for name, us in _stubbed_python_us(q, k, v, beta):
            print(f"  {name}: {us:.1f} us CPU per call")
        return
    from dfgen.kernels import build, forward

    sync = torch.cuda.synchronize
    qg, kg, vg, bg = (t.detach().clone().requires_grad_() for t in (q, k, v, beta))
    do = torch.randn_like(q)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    qsg, ksg, vsg = (t.detach().clone().requires_grad_() for t in (qs, ks, vs))
    do_s = do.transpose(1, 2).contiguous()
    rows = []
    with torch.no_grad():
        rows.append(("forward", *interleaved_us([lambda: deltaformer_attn(q, k, v, beta),
                                                 lambda: sdpa_causal(qs, ks, vs)], 200, sync)))
        rows.append(("decode step (1 token)", *interleaved_us(_decode_calls(q, k, v, beta, qs, ks, vs),
                                                             200, sync)))
    steps = [lambda: deltaformer_attn(qg, kg, vg, bg).backward(do),
             lambda: sdpa_causal(qsg, ksg, vsg).backward(do_s)]
    rows.append(("forward+backward", *interleaved_us(steps, 200, sync)))
    torch.autograd.set_multithreading_enabled(False)
    try:
        rows.append(("forward+backward (engine here)", *interleaved_us(steps, 200, sync)))
    finally:
        torch.autograd.set_multithreading_enabled(True)
    path = "Triton's (DFGEN_TRITON_LAUNCH=1)" if os.environ.get("DFGEN_TRITON_LAUNCH") == "1" \
        else "dfgen's kept kernels (dfgen/kernels/launcher.py)"
    if args.compiled:
        rows += _compiled_rows(q, k, v, beta, do, qs, ks, vs, do_s, sync)
    print(f"\nshape (B, T, H, D) = {shape}, bf16; launch path: {path}; us per eager call "
          "(wall / process CPU)")
    print("| call | dfgen wall | SDPA wall | dfgen - SDPA | dfgen CPU | SDPA CPU |")
    print("|---|---|---|---|---|---|")
    for name, (d_wall, d_cpu), (s_wall, s_cpu) in rows:
        print(f"| {name} | {d_wall:.1f} | {s_wall:.1f} | {d_wall - s_wall:+.1f} | {d_cpu:.1f} | "
              f"{s_cpu:.1f} |")
    cfg = resolve_config(None, q, False)
    with torch.no_grad():
        module = build.load("solve_fwd", q.dtype, shape[3], cfg.solve)
        u, o, _, lse, flags = forward.solve_buffers(q, module, write_o=True)

        def launch():
            flags.zero_()
            module.launch(q, k, v, beta, u, o, None, lse, flags, shape[3] ** -0.5)
        direct = per_call_us(launch, 200, sync)[1]
        sync()
    modules = list(build._loaded.values())  # every kernel module the calls above used
    real_launches = [m.launch for m in modules]
    for m in modules:
        m.launch = lambda *args, **kwargs: None  # everything dfgen does but the launches
    try:
        with torch.no_grad():
            python_only = per_call_us(lambda: deltaformer_attn(q, k, v, beta), 200, sync)[1]
        python_step = per_call_us(lambda: deltaformer_attn(qg, kg, vg, bg).backward(do), 200, sync)[1]
    finally:
        for m, launch in zip(modules, real_launches):
            m.launch = launch
    sync()
    print(f"\nforward's kernel launched directly on preallocated outputs (flags zeroed): {direct:.1f} us "
          f"CPU; with every Triton launch stubbed out, dfgen's CPU time per forward: "
          f"{python_only:.1f} us, per forward+backward: {python_step:.1f} us")


def _stubbed_python_us(q, k, v, beta):
    """[(call, us)]: dfgen's Python per forward, forward+backward and decode step with every
    generated kernel replaced by a no-op (their launch functions still run)."""
    from dfgen.kernels import build

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    load = build.load

    def stubbed(*args, **kwargs):
        module = load(*args, **kwargs)
        for name in list(vars(module)):
            if name.endswith("_kernel"):
                setattr(module, name, Stub())
        return module

    build.load = stubbed
    try:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, beta)]
        do = torch.randn_like(q)
        with torch.no_grad():
            step = _decode_calls(q, k, v, beta, q, k, v)[0]
            rows = [("forward", per_call_us(lambda: deltaformer_attn(q, k, v, beta), 500)[1]),
                    ("decode step", per_call_us(step, 500)[1])]
        rows.append(("forward+backward",
                     per_call_us(lambda: deltaformer_attn(*leaves).backward(do), 200)[1]))
        return rows
    finally:
        build.load = load


def _decode_calls(q, k, v, beta, qs, ks, vs):
    """One decode step after a prefill of the shape's T tokens (the cache rewound on the host
    before each call, no launch), and SDPA's one-query attention over the same keys."""
    from dfgen.runtime import deltaformer_decode

    T = q.shape[1]
    _, cache = deltaformer_attn(q, k, v, beta, return_cache=True)
    cache.reserve(1)
    start, written = cache.lengths.clone(), torch.empty_like(cache.lengths)
    new = [t[:, :1] for t in (q, k, v, beta)]

    def step():
        cache.max_length, cache.lengths, cache._spare = T, start, written
        deltaformer_decode(*new, cache)

    query = qs[:, :, :1]
    return [step, lambda: torch.nn.functional.scaled_dot_product_attention(query, ks, vs)]


def _compiled_rows(q, k, v, beta, do, qs, ks, vs, do_s, sync):
    """Forward and forward+backward of dfgen and SDPA, each under torch.compile with CUDA
    graphs (mode='reduce-overhead'), as a model compiled that way runs them."""
    attn = torch.compile(lambda *t: deltaformer_attn(*t), mode="reduce-overhead", fullgraph=True)
    sdpa = torch.compile(lambda *t: sdpa_causal(*t), mode="reduce-overhead", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, beta)]
    leaves_s = [t.detach().clone().requires_grad_() for t in (qs, ks, vs)]

    def step(fn, inputs, grad):  # gradients not accumulated into .grad: each replay
        torch.compiler.cudagraph_mark_step_begin()  # overwrites the last one's outputs
        torch.autograd.grad(fn(*inputs), inputs, grad)

    def fwd(fn, inputs):
        torch.compiler.cudagraph_mark_step_begin()
        fn(*inputs)
    with torch.no_grad():
        forward = interleaved_us([lambda: fwd(attn, (q, k, v, beta)),
                                  lambda: fwd(sdpa, (qs, ks, vs))], 200, sync)
    both = interleaved_us([lambda: step(attn, leaves, do), lambda: step(sdpa, leaves_s, do_s)],
                          200, sync)
    return [("forward, compiled (CUDA graphs)", *forward),
            ("forward+backward, compiled (CUDA graphs)", *both)]


if __name__ == "__main__":
    main()
