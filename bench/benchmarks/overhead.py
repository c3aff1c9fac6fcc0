"""Per-call CPU overhead of dfgen.runtime.deltaformer_attn above the kernels.

    python bench/run.py overhead

Measures (median of many calls, CPU time):
  dispatch   input checks + tuned-config lookup + config check (what runtime adds before
             any kernel work); runs anywhere.
  on a GPU also:
  call       deltaformer_attn at a tiny shape, where the kernels take microseconds
  launch     the same kernels launched directly (preallocated outputs, no dfgen Python)
  stubbed    deltaformer_attn with the Triton launch replaced by a no-op: dfgen's own CPU
             time per call (checks, lookup, allocating outputs, zeroing the flags)
Bursts of 100 calls with a synchronize (untimed) before each, so a full GPU queue cannot
stall the timed calls.
"""
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
from dfgen.tools.check import random_inputs


def cpu_us(fn, n=2000, sync=None):
    """Median CPU time of one call (us), over bursts of n calls; `sync` (untimed) runs
    before each burst, so that a GPU queue that fills up cannot stall the timed calls."""
    fn()
    samples = []
    for _ in range(7):
        if sync:
            sync()
        start = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - start) / n * 1e6)
    return statistics.median(samples)


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v, beta = random_inputs((1, 256, 4, 64), torch.bfloat16, device, seed=0)

    def dispatch():
        check_inputs(q, k, v, beta)
        resolve_config(None, q, False)

    print(f"dispatch: {cpu_us(dispatch):.2f} us per call (input checks + lookup + config check)")
    given = KernelConfig("fused", dict(resolve_config(None, q, False).solve))

    def dispatch_given():
        check_inputs(q, k, v, beta)
        resolve_config(given, q, False)

    print(f"dispatch with a config passed: {cpu_us(dispatch_given):.2f} us per call")
    if device.type != "cuda":
        print("no GPU: call and launch overheads need one")
        return
    from dfgen.kernels import build, forward

    cfg = resolve_config(None, q, False)
    sync = torch.cuda.synchronize
    with torch.no_grad():
        module = build.load("solve_fwd", q.dtype, 64, cfg.solve)
        call = cpu_us(lambda: deltaformer_attn(q, k, v, beta), n=100, sync=sync)
        u, o, _, lse, flags = forward.solve_buffers(q, module, write_o=True)

        def launch():
            flags.zero_()
            module.launch(q, k, v, beta, u, o, None, lse, flags, 0.125)
        direct = cpu_us(launch, n=100, sync=sync)
        real_launch = module.launch
        module.launch = lambda *args, **kwargs: None  # everything dfgen does but the launch
        try:
            python_only = cpu_us(lambda: deltaformer_attn(q, k, v, beta), n=100, sync=sync)
        finally:
            module.launch = real_launch
        sync()
    print(f"call: {call:.2f} us; the same kernels launched directly on preallocated outputs: "
          f"{direct:.2f} us; difference: {call - direct:.2f} us per call")
    print(f"dfgen's CPU time per call with the Triton launch stubbed out (checks, lookup, "
          f"output allocation, the flags' memset): {python_only:.2f} us")


if __name__ == "__main__":
    main()
