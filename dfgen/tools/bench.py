"""Benchmark: dfgen against torch SDPA causal attention and fla's DeltaFormer, forward or
forward+backward (with the peak memory of one pass).

All columns of one row are measured in one process, side by side, on fresh random
inputs (never zeros), with triton.testing.do_bench medians. fla's DeltaFormer is its
Triton u-stage (ParallelDeltaformerFunction) followed by torch SDPA for the output, as
fla's own output stage needs flash-attn. Given several candidate configs, each is first
checked against the naive reference at that shape; the fastest correct one is reported.
Without a GPU the same pipeline runs in Triton's interpreter at a tiny size; those
timings are interpreter timings, not GPU timings.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from .arguments import CPU_SHAPES
from .check import check, passes, random_pass_inputs, reference
from .timing import timer

GPU_SHAPES = [(1, 4096, 16, 128), (1, 8192, 16, 128), (4, 2048, 16, 64), (8, 1024, 32, 64),
              (2, 8192, 16, 64), (1, 16384, 8, 128)]


def attention_flops(B, T, H, D) -> float:
    """One causal attention forward: 4 * B * H * D * T^2 / 2."""
    return 4.0 * B * H * D * T * T / 2


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
    error: float
    flops: float
    tried: list = field(default_factory=list)  # (config, ms or None, error or message)
    memory_mib: dict | None = None  # peak of one pass: dfgen, SDPA, and the inputs alone

    @property
    def tflops(self) -> float:
        return self.flops / (self.dfgen_ms * 1e-3) / 1e12

    @property
    def ratio(self) -> float:
        return self.dfgen_ms / self.sdpa_ms


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_shape(shape, dtype, device, configs, with_fla=True, log=None, backward=False) -> Row:
    """Time dfgen (fastest correct candidate), SDPA and fla on one shape, forward or
    forward+backward, all on the same fresh inputs."""
    on_gpu = device.type == "cuda"
    time_ms = timer(on_gpu)
    q, k, v, beta, do, _ = random_pass_inputs(shape, dtype, device)
    ref = reference(q, k, v, beta, do, backward, torch.float32 if on_gpu else torch.float64)
    best = None
    tried = []
    for cfg in configs:
        try:
            err, run = check(cfg, backward, q, k, v, beta, do, ref)
            if not passes(err, dtype, backward):
                tried.append((cfg, None, f"wrong: relative error {err:.2e}"))
                continue
            ms = time_ms(run)
        except Exception as exc:  # a failing candidate is reported, not fatal
            tried.append((cfg, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
            continue
        tried.append((cfg, ms, err))
        if best is None or ms < best[1]:
            best = (cfg, ms, err, run)
        if log:
            log(f"  {shape} {ms:8.3f} ms err {err:.2e} {cfg}")
    del ref
    if best is None:
        raise RuntimeError(f"no config passed at {shape}: " + "; ".join(
            f"{c}: {m}" for c, _, m in tried))

    qh, kh, vh = (t.transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v))
    doh = do.transpose(1, 2).contiguous()
    if backward:
        def sdpa_run():
            o = sdpa_causal(qh, kh, vh)
            return torch.autograd.grad(o, (qh, kh, vh), doh)
    else:
        def sdpa_run():
            with torch.no_grad():
                return sdpa_causal(qh, kh, vh)
    sdpa_ms = time_ms(sdpa_run)
    fla_ms = None
    fla_u = _fla_u_fn() if (with_fla and on_gpu) else None
    if fla_u is not None:
        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v, beta)]

        def fla_run():
            with torch.set_grad_enabled(backward):
                u = fla_u.apply(*leaves)
                o = sdpa_causal(leaves[0].transpose(1, 2), leaves[1].transpose(1, 2),
                                u.transpose(1, 2))
                return torch.autograd.grad(o, leaves, doh) if backward else o
        fla_ms = time_ms(fla_run)
    memory = None
    if on_gpu and backward:
        inputs_mib = sum(t.numel() * t.element_size() for t in (q, k, v, beta, do)) / 2**20
        memory = dict(dfgen=_peak_mib(best[3]), sdpa=_peak_mib(sdpa_run), inputs=inputs_mib)
    flops = attention_flops(*shape) * (3.5 if backward else 1.0)
    return Row(shape, best[1], sdpa_ms, fla_ms, str(best[0]), best[2], flops, tried, memory)


def format_table(rows, dtype, device, n_configs, backward=False) -> str:
    what = "fwd+bwd" if backward else "fwd"
    lines = []
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
                     f"triton {_triton_version()}, {str(dtype).replace('torch.', '')}, "
                     "median ms of triton.testing.do_bench, all columns in one process")
    else:
        lines.append("NOT GPU TIMINGS: no CUDA device, so dfgen ran in Triton's interpreter on "
                     "the CPU at a tiny size; the numbers only show that the pipeline runs.")
    if n_configs > 1:
        lines.append(f"dfgen: fastest of {n_configs} candidate configs that passed the "
                     "reference check at that shape")
    if backward:
        lines.append("TFLOP/s counts fwd+bwd as 3.5 causal attention passes; peak memory is "
                     "what one fwd+bwd allocates beyond the live tensors")
    header = (f"| B, T, H, D | dfgen {what} ms | SDPA {what} ms | fla {what} ms | dfgen TFLOP/s "
              "| dfgen/SDPA | fla/SDPA | rel. error |")
    if backward:
        header += " peak MiB dfgen / SDPA / inputs |"
    lines += [header, "|" + "---|" * (9 if backward else 8)]
    for r in rows:
        fla = f"{r.fla_ms:.3f}" if r.fla_ms is not None else "n/a"
        fla_ratio = f"{r.fla_ms / r.sdpa_ms:.1f}x" if r.fla_ms is not None else "n/a"
        shape = ", ".join(str(s) for s in r.shape)
        line = (f"| {shape} | {r.dfgen_ms:.3f} | {r.sdpa_ms:.3f} | {fla} | {r.tflops:.1f} "
                f"| {r.ratio:.2f}x | {fla_ratio} | {r.error:.1e} |")
        if backward:
            mem = r.memory_mib
            line += (f" {mem['dfgen']:.0f} / {mem['sdpa']:.0f} / {mem['inputs']:.0f} |" if mem
                     else " n/a |")
        lines.append(line)
    lines.append("configs: " + "; ".join(f"{','.join(map(str, r.shape))}: {r.config}" for r in rows))
    return "\n".join(lines)


def _triton_version() -> str:
    import triton

    return triton.__version__


def run(shapes=None, dtype=torch.bfloat16, configs=None, with_fla=True, verbose=False,
        backward=False) -> str:
    """Benchmark every shape and return the table. Uses the GPU when there is one, else
    the interpreter (TRITON_INTERPRET must then be set before kernels load)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shapes is None:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else None
    rows, sources = [], set()
    for shape in shapes:
        if configs:
            candidates = configs
        else:  # what the runtime would pick: the tuned entry for this GPU and shape, or the default
            choice = runtime_choice(shape, dtype, device, backward)
            candidates = [choice.config]
            sources.add(choice.source.split(" [")[0])
        started = time.perf_counter()
        row = bench_shape(tuple(shape), dtype, device, candidates, with_fla, log, backward)
        rows.append(row)
        fla = f"{row.fla_ms:.3f}" if row.fla_ms is not None else "n/a"
        print(f"dfgen bench: {row.shape} dfgen {row.dfgen_ms:.3f} ms, SDPA {row.sdpa_ms:.3f} ms, "
              f"fla {fla} ms, {row.ratio:.2f}x SDPA, memory {row.memory_mib} "
              f"({time.perf_counter() - started:.0f} s for this row)", file=sys.stderr, flush=True)
    table = format_table(rows, dtype, device, len(configs or [None]), backward)
    if sources:
        table += "\nconfigs chosen as the runtime chooses them, from: " + ", ".join(sorted(sources))
    return table


def runtime_choice(shape, dtype, device, backward: bool):
    """The dispatcher's Choice for a [B, T, H, D] call (tuned entry or built-in default)."""
    from ..select.bucket import Bucket
    from ..select.dispatch import dispatcher_for
    from ..settings import dtype_name

    B, T, H, D = shape
    return dispatcher_for(device).choose(
        Bucket("fwd+bwd" if backward else "fwd", dtype_name(dtype), D, T, B * H))
