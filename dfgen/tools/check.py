"""Check a config against the naive reference on fresh random inputs: the one gate used by
the benchmark, the tuner and `dfgen check`. The runtime never imports it."""

from __future__ import annotations

import torch

from ..reference import naive_deltaformer_attn, naive_deltaformer_u
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


def check_length(T: int, device, max_T: int | None = None) -> int:
    """The sequence (or cache) length a check of a bucket of length T runs at on `device`:
    T capped at max_T, by default 1024 on a GPU and 48 in the interpreter."""
    return min(T, max_T or (1024 if device.type == "cuda" else 48))


def validate_config(config, entry: dict, device, max_T: int | None = None) -> tuple[bool, str]:
    """Check a tuned entry's config on fresh inputs at its bucket's shape (T capped at
    max_T, default 1024 on a GPU and 48 in the interpreter). (ok, message)."""
    backward = entry["pass"] == "fwd+bwd"
    dtype = torch_dtype(entry["dtype"])
    shape = (1, check_length(entry["T"], device, max_T), min(entry["BH"], 4), entry["head_dim"])
    q, k, v, beta, do, q_solve = random_pass_inputs(shape, dtype, device,
                                                    with_q_solve=entry.get("variant") == "qsolve")
    try:
        err, _ = check(config, backward, q, k, v, beta, do, q_solve=q_solve)
    except Exception as exc:  # noqa: BLE001 - any failure fails the check, with its reason
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    if not passes(err, dtype, backward):
        return False, f"relative error {err:.2e} at {shape}"
    return True, f"relative error {err:.2e} at {shape}"


DECODE_STEPS = (1, 3)  # new tokens per step of a decode check: plain decoding, then several
# A decoding step reads the prefill's u as the cache stores them (rounded to the inputs'
# dtype) and rounds its own o and u: bfloat16 steps land at 5e-3 to 1e-2 against the
# float64 reference (tests/test_decode.py allows 2e-2), float16 near 3e-4.
DECODE_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def decode_check(knobs, dtype, device, cache_length: int, B: int, H: int, head_dim: int,
                 seed=None) -> float:
    """The largest relative error of decoding steps under `knobs` against the reference: a
    prefill of `cache_length` random tokens (the runtime's forward), then steps of
    DECODE_STEPS new tokens; each step's o and the u it appends to the cache must match
    the whole sequence recomputed by dfgen.reference's naive functions (float64 on the CPU,
    float32 on a GPU). Raises what the kernels raise."""
    from ..api.attention import deltaformer_attn
    from ..api.decode import deltaformer_decode

    T = cache_length + sum(DECODE_STEPS)
    q, k, v, beta = random_inputs((B, T, H, head_dim), dtype, device, seed)
    with torch.no_grad():
        _, cache = deltaformer_attn(q[:, :cache_length], k[:, :cache_length], v[:, :cache_length],
                                    beta[:, :cache_length], return_cache=True)
        outs, t = [], cache_length
        for n in DECODE_STEPS:
            piece = slice(t, t + n)
            outs.append(deltaformer_decode(q[:, piece], k[:, piece], v[:, piece], beta[:, piece],
                                           cache, config=dict(knobs)))
            t += n
    compute = torch.float32 if device.type == "cuda" else torch.float64
    ref_o = naive_deltaformer_attn(q, k, v, beta, compute)
    ref_u = naive_deltaformer_u(q, k, v, beta, compute)
    decoded = slice(cache_length, T)
    return max(relative_error(torch.cat(outs, 1), ref_o[:, decoded]),
               relative_error(cache.solved_values()[:, decoded], ref_u[:, decoded]))


def decode_shape(BH: int) -> tuple[int, int]:
    """(B, H) of a decode bucket's B*H: batches of 16 heads (B = max(1, BH // 16)), as the
    tuner's inputs and a model's layers hold them."""
    B = max(1, BH // 16)
    return B, max(1, BH // B)


def validate_decode_entry(entry: dict, device, max_T: int | None = None) -> tuple[bool, str]:
    """Check a tuned decode entry's knobs (over the built-in default's) with decode_check on
    fresh inputs: a cache of its bucket's T tokens (capped at max_T, default 1024 on a GPU
    and 48 in the interpreter) at B*H up to 4 (the interpreter: 2). (ok, message)."""
    from ..kernels.decode import decode_knobs
    from ..select.tuned_file import decode_section

    dtype = torch_dtype(entry["dtype"])
    on_gpu = device.type == "cuda"
    length = max(1, check_length(entry["T"], device, max_T) - sum(DECODE_STEPS))
    B, H = decode_shape(min(entry["BH"], 4 if on_gpu else 2))
    knobs = decode_knobs(decode_section(entry["config"]), entry["head_dim"], dtype)
    where = f"a cache of {length} tokens, B {B}, H {H}, steps of {', '.join(map(str, DECODE_STEPS))}"
    try:
        err = decode_check(knobs, dtype, device, length, B, H, entry["head_dim"])
    except Exception as exc:  # noqa: BLE001 - any failure fails the check, with its reason
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    if not err <= DECODE_TOLERANCE[dtype]:  # NaN fails too
        return False, f"relative error {err:.2e} with {where}"
    return True, f"relative error {err:.2e} with {where}"
