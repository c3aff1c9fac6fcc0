"""Forward benchmark: dfgen against torch SDPA causal attention and fla's DeltaFormer.

All columns of one row are measured in one process, side by side, on fresh random
inputs (never zeros), with triton.testing.do_bench medians. fla's DeltaFormer is its
Triton u-stage (ParallelDeltaformerFunction) followed by torch SDPA for the output, as
fla's own output stage needs flash-attn. Without a GPU the same pipeline runs in Triton's
interpreter at a tiny size; those timings are interpreter timings, not GPU timings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ForwardConfig, default_config
from .forward import forward

GPU_SHAPES = [(1, 4096, 16, 128), (1, 8192, 16, 128), (4, 2048, 16, 64), (8, 1024, 32, 64),
              (2, 8192, 16, 64), (1, 16384, 8, 128)]
CPU_SHAPES = [(1, 64, 2, 32), (2, 48, 1, 32)]


def attention_flops(B, T, H, D) -> float:
    """One causal attention forward: 4 * B * H * D * T^2 / 2."""
    return 4.0 * B * H * D * T * T / 2


def random_inputs(shape, dtype, device, seed=None):
    B, T, H, D = shape
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed() % (2**31))
    q, k, v = (torch.randn(B, T, H, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
               for _ in range(3))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, device=device))
    return q, k, v, beta


def _fla_u_fn():
    try:
        from fla.ops.deltaformer.parallel import ParallelDeltaformerFunction
    except Exception:  # fla missing or broken: the column stays empty
        return None
    return ParallelDeltaformerFunction


def sdpa_causal(q, k, v):
    """SDPA on [B, H, T, D] tensors."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@dataclass
class Row:
    shape: tuple
    dfgen_ms: float
    sdpa_ms: float
    fla_ms: float | None
    config: str

    @property
    def tflops(self) -> float:
        return attention_flops(*self.shape) / (self.dfgen_ms * 1e-3) / 1e12

    @property
    def ratio(self) -> float:
        return self.dfgen_ms / self.sdpa_ms


def _timer(on_gpu: bool):
    if on_gpu:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    import statistics
    import time

    def cpu_time(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time


def bench_shape(shape, dtype, device, config: ForwardConfig | None, with_fla=True) -> Row:
    on_gpu = device.type == "cuda"
    time_ms = _timer(on_gpu)
    q, k, v, beta = random_inputs(shape, dtype, device)
    cfg = config or default_config(shape[3], dtype)
    with torch.no_grad():
        dfgen_ms = time_ms(lambda: forward(q, k, v, beta, cfg))
        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        sdpa_ms = time_ms(lambda: sdpa_causal(qh, kh, vh))
        fla_ms = None
        fla_u = _fla_u_fn() if (with_fla and on_gpu) else None
        if fla_u is not None:
            def fla_forward():
                u = fla_u.apply(q, k, v, beta)
                return sdpa_causal(qh, kh, u.transpose(1, 2))
            fla_ms = time_ms(fla_forward)
    return Row(shape, dfgen_ms, sdpa_ms, fla_ms, str(cfg))


def format_table(rows, dtype, device) -> str:
    lines = []
    on_gpu = device.type == "cuda"
    if on_gpu:
        lines.append(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
                     f"triton {_triton_version()}, dtype {str(dtype).replace('torch.', '')}, "
                     "median ms (triton.testing.do_bench)")
    else:
        lines.append("NOT GPU TIMINGS: no CUDA device, so dfgen ran in Triton's interpreter on "
                     "the CPU at a tiny size; the numbers only show that the pipeline runs.")
    header = ("| B, T, H, D | dfgen fwd ms | SDPA fwd ms | fla fwd ms | dfgen TFLOP/s "
              "| dfgen/SDPA | fla/SDPA |")
    lines += [header, "|" + "---|" * 7]
    for r in rows:
        fla = f"{r.fla_ms:.3f}" if r.fla_ms is not None else "n/a"
        fla_ratio = f"{r.fla_ms / r.sdpa_ms:.2f}x" if r.fla_ms is not None else "n/a"
        shape = ", ".join(str(s) for s in r.shape)
        lines.append(f"| {shape} | {r.dfgen_ms:.3f} | {r.sdpa_ms:.3f} | {fla} | {r.tflops:.1f} "
                     f"| {r.ratio:.2f}x | {fla_ratio} |")
    configs = sorted({r.config for r in rows})
    lines.append("dfgen config(s): " + "; ".join(configs))
    return "\n".join(lines)


def _triton_version() -> str:
    import triton

    return triton.__version__


def run(shapes=None, dtype=torch.bfloat16, config: ForwardConfig | None = None,
        with_fla=True) -> str:
    """Benchmark every shape and return the table. Uses the GPU when there is one, else
    the interpreter (TRITON_INTERPRET must then be set before kernels load)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shapes is None:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    rows = [bench_shape(tuple(s), dtype, device, config, with_fla) for s in shapes]
    return format_table(rows, dtype, device)
