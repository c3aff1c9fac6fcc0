"""Test setup. Without a CUDA device the kernels run in Triton's interpreter (slow: tiny
sizes); with one, the GPU cases run too. Generated sources go to a fresh cache folder, and
the user's own tuned files (~/.config/dfgen/tuned) are out of reach.

The tests run against the installed package: with DFGEN_TEST_INSTALLED=1 (CI) they refuse
to start if `import dfgen` finds anything but an installed copy."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import dfgen

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before any generated kernel module is imported
os.environ.setdefault("DFGEN_CACHE_DIR", tempfile.mkdtemp(prefix="dfgen-test-cache-"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# a user's tuned files must not change what the tests run
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="dfgen-test-config-")
os.environ.pop("DFGEN_TUNED_DIR", None)

DFGEN_PACKAGE = Path(dfgen.__file__).resolve().parent
CHECKOUT = Path(__file__).resolve().parent.parent
if os.environ.get("DFGEN_TEST_INSTALLED") == "1" and DFGEN_PACKAGE.is_relative_to(CHECKOUT):
    raise pytest.UsageError(
        f"dfgen was imported from the checkout ({DFGEN_PACKAGE}), not from the installed "
        "package: run pytest from a folder outside the checkout")


def pytest_report_header(config):
    return f"dfgen {dfgen.__version__} from {DFGEN_PACKAGE}"


def dfgen_command() -> list[str]:
    """The installed `dfgen` console script of this Python's environment."""
    beside = Path(sys.executable).parent / "dfgen"
    found = str(beside) if beside.is_file() else shutil.which("dfgen")
    assert found, "the `dfgen` command is not installed (pip install the package first)"
    return [found]

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# relative-error bounds against the float64/float32 reference, by input dtype
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}
# float32 inputs through a solve in tf32 (or an fp16 inverse) keep tf32's 10-bit mantissa,
# float16's: they get float16's bound
TF32_TOL = 3e-3


def tolerance(dtype, solve_knobs=None):
    precision = solve_knobs["SOLVE_PRECISION"] if solve_knobs is not None else None
    if precision == "bf16":  # bfloat16 operands in the solve: bfloat16's bound, whatever the inputs
        return TOL[torch.bfloat16]
    if dtype == torch.float32 and solve_knobs is not None and (
            precision in ("tf32", "fp16") or solve_knobs["INV_FP16"]):
        return TF32_TOL
    return TOL[dtype]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def assert_close(out, ref, dtype, what="", tol=None):
    tol = TOL[dtype] if tol is None else tol
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"


def make_inputs(B, T, H, D, dtype, beta="rand", seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(dtype).to(device) for _ in range(3))
    if beta is None:
        b = None
    elif beta == "rand":
        b = torch.rand(B, T, H, generator=gen).to(device)
    else:  # a constant above 1, as a raw un-squashed projection can give
        b = torch.full((B, T, H), float(beta)).to(device)
    return q, k, v, b


def make_grouped_inputs(B, T, H, H_kv, D, dtype, seed):
    """q [B, T, H, D], k and v [B, T, H_kv, D] (grouped heads when H_kv < H), beta [B, T, H]
    in (0, 1), random from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen).to(dtype).to(DEVICE)
    k, v = (torch.randn(B, T, H_kv, D, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    beta = torch.rand(B, T, H, generator=gen).to(DEVICE)
    return q, k, v, beta


gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (larger sizes)")


def tune_studies(journal) -> dict:
    """{study name: optuna Study} of every study in a tune's journal file."""
    import optuna

    from dfgen.tools.tuning import tuner

    storage = tuner.open_storage(str(journal))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
            for s in optuna.get_all_study_summaries(storage)}


def crash_candidates_with_two_warps(monkeypatch) -> None:
    """In this test's tunes, every candidate with two warps kills its worker (the worker's
    test hook): the next worker is started with the hook allowed."""
    from dfgen.tools.tuning import stages, worker

    monkeypatch.setenv(worker.TEST_FAULTS, "1")
    monkeypatch.setattr(worker, "_shared", None)  # a worker started with the flag
    request = stages.StageSearch.stage_request

    def with_fault(self, params):
        out = request(self, params)
        return dict(out, test_fault="exit") if out["knobs"]["num_warps"] == 2 else out

    monkeypatch.setattr(stages.StageSearch, "stage_request", with_fault)
