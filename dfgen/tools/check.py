"""Check a config against the naive reference on fresh random inputs: the one gate used by
the benchmark, the tuner and `dfgen check`. The runtime never imports it."""

from __future__ import annotations

import torch

from ..reference import naive_deltaformer_attn
from ..settings import torch_dtype

# relative error against the reference a config must stay under, by input dtype
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}
GRAD_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN stays NaN)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def random_inputs(shape, dtype, device, seed=None):
    """q, k, v ~ N(0, 1) and beta = sigmoid(N(0, 1)), fresh unless a seed is given."""
    return _draw(shape, dtype, device, seed, extra=0)


def random_pass_inputs(shape, dtype, device, seed=None, with_q_solve: bool = False):
    """(q, k, v, beta, do, q_solve or None): random_inputs, then the output gradient do and
    (with_q_solve) the solve stage's own queries, N(0, 1), all from one generator, so that
    a seed fixes every input of a pass (a check that fails once fails again)."""
    drawn = _draw(shape, dtype, device, seed, extra=2 if with_q_solve else 1)
    return drawn if with_q_solve else (*drawn, None)


def _draw(shape, dtype, device, seed, extra: int) -> tuple:
    """q, k, v, beta and `extra` more N(0, 1) tensors of q's shape, from one generator."""
    B, T, H, D = shape
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed() % (2**31))

    def normal():
        return torch.randn(B, T, H, D, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k, v = normal(), normal(), normal()
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, device=device))
    return (q, k, v, beta, *(normal() for _ in range(extra)))


def runner(q, k, v, beta, config, backward: bool, do, q_solve=None):
    """(run, outputs): run() is one pass of dfgen under `config` (what gets timed);
    outputs() returns (o, gradients of q, k, v, beta[, q_solve] or ())."""
    from ..api.attention import deltaformer_attn
    from ..kernels.forward import forward, forward_q_solve

    if not backward:
        def run():
            with torch.no_grad():
                if q_solve is not None:
                    return forward_q_solve(q, q_solve, k, v, beta, config)[0]
                return forward(q, k, v, beta, config)[0]
        return run, lambda: (run(), ())
    leaves = [t.detach().requires_grad_() for t in (q, k, v, beta)]
    solve_leaf = q_solve.detach().requires_grad_() if q_solve is not None else None

    def outputs():
        o = deltaformer_attn(*leaves, q_solve=solve_leaf, config=config)
        return o, torch.autograd.grad(o, leaves + ([solve_leaf] if q_solve is not None else []), do)

    return (lambda: outputs()[1]), outputs


def reference(q, k, v, beta, do, backward: bool, compute_dtype, q_solve=None):
    """(o, gradients or ()) of the naive reference in compute_dtype."""
    group = q.shape[2] // k.shape[2]

    def attn(q, k, v, beta, q_solve):
        return naive_deltaformer_attn(q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2),
                                      beta, compute_dtype, q_solve=q_solve)

    if not backward:
        return attn(q, k, v, beta, q_solve), ()
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v, beta)]
    solve_leaf = q_solve.detach().to(compute_dtype).requires_grad_() if q_solve is not None else None
    o = attn(*leaves, solve_leaf)
    grads = torch.autograd.grad(o, leaves + ([solve_leaf] if q_solve is not None else []),
                                do.to(compute_dtype))
    return o.detach(), grads


def check(config, backward: bool, q, k, v, beta, do, ref=None, q_solve=None):
    """(relative error, run) of `config` on these inputs: the largest relative error of o
    and (with backward) every gradient. Raises what the kernels raise."""
    config.check(q.shape[-1], backward=backward)
    run, outputs = runner(q, k, v, beta, config, backward, do, q_solve)
    o, grads = outputs()
    if ref is None:
        ref = reference(q, k, v, beta, do, backward,
                        torch.float32 if q.is_cuda else torch.float64, q_solve)
    ref_o, ref_grads = ref
    err = max([relative_error(o, ref_o)] + [relative_error(g, r) for g, r in zip(grads, ref_grads)])
    return err, run


def passes(err: float, dtype, backward: bool) -> bool:
    return err <= (GRAD_TOLERANCE if backward else TOLERANCE)[dtype]  # NaN fails


def validate_config(config, entry: dict, device, max_T: int | None = None) -> tuple[bool, str]:
    """Check a tuned entry's config on fresh inputs at its bucket's shape (T capped at
    max_T, default 1024 on a GPU and 48 in the interpreter). (ok, message)."""
    backward = entry["pass"] == "fwd+bwd"
    dtype = torch_dtype(entry["dtype"])
    cap = max_T or (1024 if device.type == "cuda" else 48)
    shape = (1, min(entry["T"], cap), min(entry["BH"], 4), entry["head_dim"])
    q, k, v, beta, do, q_solve = random_pass_inputs(shape, dtype, device,
                                                    with_q_solve=entry.get("variant") == "qsolve")
    try:
        err, _ = check(config, backward, q, k, v, beta, do, q_solve=q_solve)
    except Exception as exc:  # noqa: BLE001 - any failure fails the check, with its reason
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    if not passes(err, dtype, backward):
        return False, f"relative error {err:.2e} at {shape}"
    return True, f"relative error {err:.2e} at {shape}"
