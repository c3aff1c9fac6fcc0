"""Check a config against the naive reference on fresh random inputs: the one gate used by
the benchmark, the tuner, `dfgen check` and the dispatcher's first-use validation."""

from __future__ import annotations

import torch

from .naive import naive_deltaformer_attn

# relative error against the reference a config must stay under, by input dtype
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}
GRAD_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN stays NaN)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def random_inputs(shape, dtype, device, seed=None):
    """q, k, v ~ N(0, 1) and beta = sigmoid(N(0, 1)), fresh unless a seed is given."""
    B, T, H, D = shape
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed() % (2**31))
    q, k, v = (torch.randn(B, T, H, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
               for _ in range(3))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, device=device))
    return q, k, v, beta


def runner(q, k, v, beta, config, backward: bool, do):
    """(run, outputs): run() is one pass of dfgen under `config` (what gets timed);
    outputs() returns (o, gradients of q, k, v, beta or ())."""
    from .forward import forward
    from .runtime import deltaformer_attn

    if not backward:
        def run():
            with torch.no_grad():
                return forward(q, k, v, beta, config)[0]
        return run, lambda: (run(), ())
    leaves = [t.detach().requires_grad_() for t in (q, k, v, beta)]

    def outputs():
        o = deltaformer_attn(*leaves, config=config)
        return o, torch.autograd.grad(o, leaves, do)

    return (lambda: outputs()[1]), outputs


def reference(q, k, v, beta, do, backward: bool, compute_dtype):
    """(o, gradients or ()) of the naive reference in compute_dtype."""
    if not backward:
        return naive_deltaformer_attn(q, k, v, beta, compute_dtype), ()
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v, beta)]
    o = naive_deltaformer_attn(*leaves, compute_dtype=compute_dtype)
    return o.detach(), torch.autograd.grad(o, leaves, do.to(compute_dtype))


def check(config, backward: bool, q, k, v, beta, do, ref=None):
    """(relative error, run) of `config` on these inputs: the largest relative error of o
    and (with backward) every gradient. Raises what the kernels raise."""
    config.check(q.shape[-1], backward=backward)
    run, outputs = runner(q, k, v, beta, config, backward, do)
    o, grads = outputs()
    if ref is None:
        ref = reference(q, k, v, beta, do, backward,
                        torch.float32 if q.is_cuda else torch.float64)
    ref_o, ref_grads = ref
    err = max([relative_error(o, ref_o)] + [relative_error(g, r) for g, r in zip(grads, ref_grads)])
    return err, run


def passes(err: float, dtype, backward: bool) -> bool:
    return err <= (GRAD_TOLERANCE if backward else TOLERANCE)[dtype]  # NaN fails


def validate_config(config, entry: dict, device, max_T: int | None = None) -> tuple[bool, str]:
    """Check a tuned entry's config on fresh inputs at its bucket's shape (T capped at
    max_T, default 1024 on a GPU and 48 in the interpreter). (ok, message)."""
    backward = entry["pass"] == "fwd+bwd"
    dtype = DTYPES[entry["dtype"]]
    cap = max_T or (1024 if device.type == "cuda" else 48)
    shape = (1, min(entry["T"], cap), min(entry["BH"], 4), entry["head_dim"])
    q, k, v, beta = random_inputs(shape, dtype, device)
    do = torch.randn_like(q)
    try:
        err, _ = check(config, backward, q, k, v, beta, do)
    except Exception as exc:  # noqa: BLE001 - any failure fails the check, with its reason
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    if not passes(err, dtype, backward):
        return False, f"relative error {err:.2e} at {shape}"
    return True, f"relative error {err:.2e} at {shape}"
