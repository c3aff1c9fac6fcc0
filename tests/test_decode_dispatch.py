"""Decode entries of tuned files: a decoding step's knobs from the nearest decode entry (never
a forward's, and a forward never from a decode entry), the default where none fits, one
warning and the default for knobs the decode template does not take, hostile files that
never crash a step, and the memoized per-step lookup."""

import warnings

import pytest
import torch

from conftest import DEVICE, assert_close, make_grouped_inputs
from dfgen.errors import ConfigError
from dfgen.kernels.decode import default_decode_knobs
from dfgen.select import dispatch, tuned_file
from dfgen.select.bucket import DECODE_MIN_T, Bucket, decode_t
from dfgen.select.dispatch import Dispatcher
from dfgen.select.gpu import GpuIdentity, identify

H200 = GpuIdentity("h200", "h200", "9.0", 132, "NVIDIA H200")
TUNED = {"BLOCK_M": 16, "BLOCK_N": 16, "MIN_PROGRAMS": 1024, "num_warps": 2, "num_stages": 2}


def decode_entry(T=8192, BH=128, dtype="bf16", head_dim=128, **knobs):
    return {"pass": "decode", "dtype": dtype, "head_dim": head_dim, "T": T, "BH": BH,
            "config": {"decode": dict(TUNED, **knobs)}, "median_ms": 0.05, "default_ms": 0.06,
            "tuned_with": {"templates": tuned_file.templates_of("decode")}}


def fwd_entry(T=8192, BH=128, dtype="bf16", head_dim=128):
    from dfgen.kernels.config import default_config
    from dfgen.settings import torch_dtype

    cfg = default_config(head_dim, torch_dtype(dtype)).to_dict()
    cfg["solve"] = dict(cfg["solve"], LOOKAHEAD=1)
    return {"pass": "fwd", "dtype": dtype, "head_dim": head_dim, "T": T, "BH": BH, "config": cfg}


def write(folder, gpu, entries, **provenance):
    import triton

    prov = {"gpu": gpu, "triton": triton.__version__, "templates": tuned_file.templates_of("fwd"),
            **provenance}
    tuned_file.merge(folder / f"{gpu}.yaml", prov, entries)


def test_decode_buckets_round_the_cache_length_up_to_a_power_of_two():
    assert [decode_t(n) for n in (0, 1, 31, 32, 33, 4096, 4097)] == \
        [DECODE_MIN_T, DECODE_MIN_T, 32, 32, 64, 4096, 8192]
    bucket = Bucket("decode", "bf16", 128, 8192, 128)
    assert bucket.key == "decode/bf16/d128/t8192/bh128" and Bucket.from_key(bucket.key) == bucket
    with pytest.raises(ConfigError, match="a decode bucket has no variant"):
        Bucket.from_fields(dict(bucket.fields(), variant="qsolve"), "here")


def test_the_nearest_decode_entry_serves_a_step_and_never_a_forward(tmp_path):
    write(tmp_path, "h200", {"decode/bf16/d128/t8192/bh128": decode_entry(),
                             "decode/bf16/d128/t1024/bh128": decode_entry(T=1024, BLOCK_N=64),
                             "fwd/bf16/d128/t8192/bh128": fwd_entry()})
    disp = Dispatcher(H200, [tmp_path])
    choice = disp.choose(Bucket("decode", "bf16", 128, 8192, 128))
    assert choice.knobs == TUNED and "[decode/bf16/d128/t8192/bh128]" in choice.source
    assert disp.choose(Bucket("decode", "bf16", 128, 2048, 64)).knobs["BLOCK_N"] == 64  # nearer
    assert disp.choose(Bucket("decode", "bf16", 128, 16384, 256)).knobs == TUNED  # within 2x
    # past REACH, another dtype or head dim: the built-in default
    for far in (Bucket("decode", "bf16", 128, 65536, 128), Bucket("decode", "bf16", 128, 8192, 512),
                Bucket("decode", "fp16", 128, 8192, 128), Bucket("decode", "bf16", 64, 8192, 128)):
        choice = disp.choose(far)
        assert choice.source == "built-in default"
        assert choice.knobs == default_decode_knobs(far.head_dim, getattr(torch, {
            "bf16": "bfloat16", "fp16": "float16"}[far.dtype]))
    # a forward call takes the forward entry, never a decode one, and the other way round
    assert disp.choose(Bucket("fwd", "bf16", 128, 8192, 128)).config.solve["LOOKAHEAD"] == 1
    assert disp.choose(Bucket("fwd", "bf16", 128, 1024, 128)).source == "built-in default"
    assert disp.choose(Bucket("fwd+bwd", "bf16", 128, 1024, 128)).source == "built-in default"
    # a file of forward entries only: a step at their very bucket still gets the default
    write(tmp_path / "fwd-only", "h200", {"fwd/bf16/d128/t8192/bh128": fwd_entry()})
    assert Dispatcher(H200, [tmp_path / "fwd-only"]).choose(
        Bucket("decode", "bf16", 128, 8192, 128)).source == "built-in default"


def test_the_per_step_lookup_is_memoized_per_bucket(tmp_path):
    write(tmp_path, "h200", {"d": decode_entry(T=64, BH=4, dtype="fp32", head_dim=32)})
    disp = Dispatcher(H200, [tmp_path])
    first = disp.decode_step_knobs(torch.float32, 32, 40, 4)
    assert first == TUNED
    assert all(disp.decode_step_knobs(torch.float32, 32, n, 4) is first for n in range(33, 65))
    assert disp.decode_step_knobs(torch.float32, 32, 1000, 4) == default_decode_knobs(32, torch.float32)


# (the template's constraints hold for every declared value at the supported head dims, so
# no entry can fail one alone; a failed constraint takes the same path as these)
BAD_KNOBS = {
    "unknown knob": {"BLOCK_K": 16},
    "undeclared value": {"BLOCK_N": 48},
    "string for an int": {"BLOCK_N": "16"},
    "huge number": {"MIN_PROGRAMS": 10 ** 40},
    "float for an int": {"num_warps": 4.0},
    "bool for an int": {"num_stages": True},
}


@pytest.mark.parametrize("case", sorted(BAD_KNOBS))
def test_knobs_the_template_does_not_take_make_the_default_serve_with_one_warning(tmp_path, case):
    """The file stays readable and its other entries serve; the bad entry's bucket gets
    the built-in default, with one warning naming the entry, however often it is asked."""
    write(tmp_path, "h200", {"good": decode_entry(T=1024)})
    path = tmp_path / "h200.yaml"
    data = tuned_file.read(path)
    bad = decode_entry()
    bad["config"]["decode"].update(BAD_KNOBS[case])
    data["entries"]["bad"] = bad
    tuned_file.write(path, data, knobs=False)  # written as a hand or an older dfgen would
    disp = Dispatcher(H200, [tmp_path])
    with pytest.warns(UserWarning, match=r"\[bad\].*does not fit the running decode template") as caught:
        for _ in range(3):
            choice = disp.choose(Bucket("decode", "bf16", 128, 8192, 128))
            disp.decode_step_knobs(torch.bfloat16, 128, 8000, 128)
    assert len(caught) == 1
    assert choice.source.startswith("built-in default") and \
        choice.knobs == default_decode_knobs(128, torch.bfloat16)
    assert disp.choose(Bucket("decode", "bf16", 128, 1024, 128)).knobs == TUNED
    with pytest.raises(ConfigError):  # the tuner never writes such an entry
        tuned_file.write(path, data)


HOSTILE = {
    "python tag": "!!python/object/apply:os.system ['echo hostile']",
    "set tag": "!!set {16: null}",
    "binary tag": "!!binary aGVsbG8=",
    "list of knobs": "[16, 32]",
    "config not a mapping": None,
    "another section": None,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_decode_entry_never_crashes_a_lookup(tmp_path, case):
    """A value the safe loader refuses (a python tag) or builds as no scalar (a set,
    bytes, a list), or a config of another form: the file is unusable, skipped with one
    warning; nothing runs, nothing raises, the default serves."""
    import yaml

    good = yaml.safe_dump({"format": tuned_file.FORMAT, "provenance": {"gpu": "h200"},
                           "entries": {"d": decode_entry()}})
    if case == "config not a mapping":
        text = yaml.safe_dump(dict(yaml.safe_load(good), entries={"d": dict(decode_entry(), config=7)}))
    elif case == "another section":
        text = yaml.safe_dump(dict(yaml.safe_load(good), entries={"d": dict(
            decode_entry(), config={"decode": TUNED, "solve": {"CHUNK": 16}})}))
    else:
        text = good.replace("BLOCK_N: 16", f"BLOCK_N: {HOSTILE[case]}")
        assert text != good
    (tmp_path / "h200.yaml").write_text(text)
    with pytest.warns(UserWarning, match="ignoring tuned file"):
        disp = Dispatcher(H200, [tmp_path])
    assert disp.path is None
    assert disp.choose(Bucket("decode", "bf16", 128, 8192, 128)).source == "built-in default"


def test_decode_entries_go_stale_with_the_decode_template_alone(tmp_path):
    """A decode entry records the decode template's hash: current under it (no warning),
    stale when it differs; the provenance's templates (the forward's) do not concern it."""
    write(tmp_path, "h200", {"d": decode_entry()}, templates="0" * 12)  # an older forward
    old = decode_entry(T=1024)
    old["tuned_with"] = {"templates": "1" * 12}
    fwd = fwd_entry()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        disp = Dispatcher(H200, [tmp_path])  # the forward's templates changed: not its business
    assert disp.stale(disp.data["entries"]["d"]) == []
    write(tmp_path, "h200", {"old": old, "f": fwd})
    with pytest.warns(UserWarning, match="templates 111111111111"):
        disp = Dispatcher(H200, [tmp_path])
    assert disp.stale(disp.data["entries"]["f"]) == []
    assert "[old]" in disp.choose(Bucket("decode", "bf16", 128, 1024, 128)).source


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DFGEN_TUNED_DIR", str(tmp_path))
    dispatch.reset()
    yield tmp_path
    dispatch.reset()


def _steps(q, k, v, beta, T0, config=None):
    from dfgen.runtime import deltaformer_attn, deltaformer_decode

    with torch.no_grad():
        o, cache = deltaformer_attn(q[:, :T0], k[:, :T0], v[:, :T0], beta[:, :T0], return_cache=True)
        outs = [o]
        for t in range(T0, q.shape[1]):
            outs.append(deltaformer_decode(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                           beta[:, t:t + 1], cache, config=config))
    return torch.cat(outs, 1)


def test_deltaformer_decode_runs_under_the_tuned_entry_and_config_overrides(tuned_dir, monkeypatch):
    """config=None: the step runs under the tuned decode entry of its bucket (B*H 4, a
    cache of 20 to 23 tokens: T 32) and still matches the reference; config= overrides it;
    a cache past the entry's reach runs the built-in default."""
    from dfgen.api import decode as api_decode
    from dfgen.reference import naive_deltaformer_attn

    knobs_run = []
    real = api_decode.decode_step

    def recording(*args, **kwargs):
        knobs_run.append(dict(args[9]))
        return real(*args, **kwargs)

    monkeypatch.setattr(api_decode, "decode_step", recording)
    write(tuned_dir, identify(DEVICE).key,
          {"d": decode_entry(T=32, BH=4, dtype="fp32", head_dim=32, BLOCK_N=32, MIN_PROGRAMS=1)})
    q, k, v, beta = make_grouped_inputs(2, 24, 2, 1, 32, torch.float32, seed=7)
    o = _steps(q, k, v, beta, 20)
    expected = dict(TUNED, BLOCK_N=32, MIN_PROGRAMS=1)
    assert knobs_run == [expected] * 4
    ref = naive_deltaformer_attn(*(t.double() for t in (q, k, v, beta)))
    assert_close(o[:, 20:], ref[:, 20:], torch.float32, "decoded o", 1e-4)
    knobs_run.clear()
    _steps(q, k, v, beta, 22, config={"BLOCK_N": 64})
    assert knobs_run == [dict(default_decode_knobs(32, torch.float32), BLOCK_N=64)] * 2
    knobs_run.clear()
    q, k, v, beta = make_grouped_inputs(2, 131, 2, 1, 32, torch.float32, seed=8)
    _steps(q, k, v, beta, 130)  # T bucket 256: 8x the entry's
    assert knobs_run == [default_decode_knobs(32, torch.float32)]


def test_deltaformer_decode_survives_a_hostile_tuned_file(tuned_dir):
    (tuned_dir / f"{identify(DEVICE).key}.yaml").write_text(
        "format: dfgen-tuned/1\nentries:\n  d: {pass: decode, dtype: fp32, head_dim: 32, T: 32, "
        "BH: 2, config: {decode: {BLOCK_N: !!python/name:os.system }}}\n")
    q, k, v, beta = make_grouped_inputs(1, 10, 2, 2, 32, torch.float32, seed=9)
    with pytest.warns(UserWarning, match="ignoring tuned file"):
        o = _steps(q, k, v, beta, 9)
    assert torch.isfinite(o).all()


def test_the_decode_check_fails_steps_that_are_wrong(monkeypatch):
    """`dfgen check`'s decode check compares each step's o and appended u with the whole
    sequence recomputed by the reference: a step whose o is off fails it, one whose u is
    off too (the cache then holds wrong u for the next step), and a crash is a failure
    with its reason."""
    from dfgen.api import decode as api_decode
    from dfgen.tools.check import validate_decode_entry

    entry = decode_entry(T=40, BH=2, dtype="fp32", head_dim=32)
    device = DEVICE  # the GPU where there is one (the kernels run on the CPU only in the interpreter)
    ok, message = validate_decode_entry(entry, device)
    assert ok, message
    real = api_decode.decode_step

    def wrong_o(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    monkeypatch.setattr(api_decode, "decode_step", wrong_o)
    ok, message = validate_decode_entry(entry, device)
    assert not ok and message.startswith("relative error")

    def wrong_u(*args, **kwargs):
        out = real(*args, **kwargs)
        args[5].mul_(1.01)  # the u cache
        return out

    monkeypatch.setattr(api_decode, "decode_step", wrong_u)
    ok, message = validate_decode_entry(entry, device)
    assert not ok and message.startswith("relative error")

    def crash(*args, **kwargs):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(api_decode, "decode_step", crash)
    assert validate_decode_entry(entry, device) == (False, "RuntimeError: out of resources")
