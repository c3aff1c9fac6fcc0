"""Config lookup without a GPU: fake identities, every fallback step, nearest bucket,
corrupt, foreign and stale files, and the user folder override."""

import warnings

import pytest
import torch

from dfgen.select import tuned_file
from dfgen.kernels.config import default_config
from dfgen.select.bucket import Bucket
from dfgen.select.dispatch import Dispatcher
from dfgen.select.gpu import GpuIdentity, gpu_family, gpu_key
from dfgen.errors import ConfigError

H200 = GpuIdentity("h200", "h200", "9.0", 132, "NVIDIA H200")
A100_PCIE = GpuIdentity("a100-pcie-40gb", "a100", "8.0", 108, "NVIDIA A100-PCIE-40GB")
H100 = GpuIdentity("h100-80gb-hbm3", "h100", "9.0", 132, "NVIDIA H100 80GB HBM3")
L4 = GpuIdentity("l4", "l4", "8.9", 58, "NVIDIA L4")


def tuned_config(chunk=32, warps=4):
    cfg = default_config(64, torch.float32).to_dict()
    cfg["solve"] = dict(cfg["solve"], CHUNK=chunk, BLOCK_N=16, LOOKAHEAD=1, num_warps=warps)
    return cfg


def entry(T, BH=16, pass_="fwd", dtype="fp32", chunk=32, warps=4):
    return {"pass": pass_, "dtype": dtype, "head_dim": 64, "T": T, "BH": BH,
            "config": tuned_config(chunk, warps), "median_ms": 1.0, "trials": 3}


def write(folder, gpu, entries, **provenance):
    import triton

    from dfgen.kernels.spec import templates_hash

    prov = {"gpu": gpu, "triton": triton.__version__, "templates": templates_hash(), **provenance}
    tuned_file.merge(folder / f"{gpu}.yaml", prov, entries)


def test_names_and_families():
    assert gpu_key("NVIDIA H200") == "h200" and gpu_family("h200") == "h200"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert gpu_family("a100-sxm4-80gb") == "a100"
    assert gpu_family("geforce-rtx-4090") == "rtx-4090"


def test_no_file_means_built_in_default(tmp_path):
    choice = Dispatcher(H200, [tmp_path]).choose(Bucket("fwd", "fp32", 64, 1024, 16))
    assert choice.source == "built-in default"
    assert choice.config == default_config(64, torch.float32)


def test_exact_then_family_then_compute_capability(tmp_path):
    user, packaged = tmp_path / "user", tmp_path / "packaged"
    write(packaged, "a100-sxm4-80gb", {"e": entry(1024, chunk=16)}, compute_capability="8.0")
    write(packaged, "h200", {"e": entry(1024, chunk=64)}, compute_capability="9.0")
    # family: an A100 PCIe uses the A100 SXM file
    choice = Dispatcher(A100_PCIE, [user, packaged]).choose(Bucket("fwd", "fp32", 64, 1024, 16))
    assert choice.config.solve["CHUNK"] == 16 and "same family" in choice.source
    # compute capability: an H100 (9.0) uses the H200 file
    choice = Dispatcher(H100, [user, packaged]).choose(Bucket("fwd", "fp32", 64, 1024, 16))
    assert choice.config.solve["CHUNK"] == 64 and "compute capability 9.0" in choice.source
    # nothing for an L4 (8.9)
    assert Dispatcher(L4, [user, packaged]).choose(Bucket("fwd", "fp32", 64, 1024, 16)).source == "built-in default"
    # a user folder overrides the packaged one
    write(user, "h200", {"e": entry(1024, chunk=32)}, compute_capability="9.0")
    choice = Dispatcher(H200, [user, packaged]).choose(Bucket("fwd", "fp32", 64, 1024, 16))
    assert choice.config.solve["CHUNK"] == 32 and str(user) in choice.source


def test_nearest_bucket_on_a_log_scale(tmp_path):
    write(tmp_path, "h200", {"t1k": entry(1024, chunk=16), "t4k": entry(4096, chunk=32),
                             "t4k-bwd": entry(4096, pass_="fwd+bwd", chunk=64),
                             "bf16": entry(3000, dtype="bf16", chunk=128, warps=8)})
    disp = Dispatcher(H200, [tmp_path])
    assert disp.choose(Bucket("fwd", "fp32", 64, 3000, 16)).config.solve["CHUNK"] == 32  # 4096 nearer
    assert disp.choose(Bucket("fwd", "fp32", 64, 1500, 16)).config.solve["CHUNK"] == 16
    assert disp.choose(Bucket("fwd+bwd", "fp32", 64, 2048, 16)).config.solve["CHUNK"] == 64  # same pass first
    assert disp.choose(Bucket("fwd+bwd", "fp32", 64, 1024, 16)).config.solve["CHUNK"] == 16  # 4096 out of reach
    assert disp.choose(Bucket("fwd", "fp32", 64, 600, 9)).config.solve["CHUNK"] == 16
    # beyond a factor 2 of every entry's T or batch*heads the built-in default serves
    assert disp.choose(Bucket("fwd", "fp32", 64, 1, 1)).source == "built-in default"
    assert disp.choose(Bucket("fwd", "fp32", 64, 1024, 33)).source == "built-in default"
    assert disp.choose(Bucket("fwd", "fp32", 64, 1024, 32)).config.solve["CHUNK"] == 16
    # another head dim has no entry: default
    assert disp.choose(Bucket("fwd", "fp32", 128, 1024, 16)).source == "built-in default"
    # cached: the same object comes back
    assert disp.choose(Bucket("fwd", "fp32", 64, 3000, 16)) is disp.choose(Bucket("fwd", "fp32", 64, 3000, 16))


def test_q_solve_calls_prefer_their_own_entries(tmp_path):
    qsolve = entry(1024, chunk=64)
    qsolve["variant"] = "qsolve"
    qsolve["config"] = dict(qsolve["config"], strategy="two_stage",
                            attn=dict(default_config(64, torch.float32, "two_stage").attn))
    write(tmp_path, "h200", {"plain": entry(1024, chunk=16), "qsolve": qsolve})
    disp = Dispatcher(H200, [tmp_path])
    assert disp.choose(Bucket("fwd", "fp32", 64, 1024, 16)).config.solve["CHUNK"] == 16
    choice = disp.choose(Bucket("fwd", "fp32", 64, 1024, 16, "qsolve"))
    assert choice.config.solve["CHUNK"] == 64 and choice.config.strategy == "two_stage"


def test_corrupt_file_warns_and_falls_back(tmp_path, monkeypatch):
    (tmp_path / "h200.yaml").write_text("format: dfgen-tuned/1\nentries: [oops\n")
    with pytest.warns(UserWarning, match="h200.yaml"):
        disp = Dispatcher(H200, [tmp_path])
    assert disp.choose(Bucket("fwd", "fp32", 64, 1024, 16)).source == "built-in default"
    monkeypatch.setenv("DFGEN_STRICT", "1")
    with pytest.raises(ConfigError, match="h200.yaml"):
        Dispatcher(H200, [tmp_path])


def test_foreign_file_is_ignored(tmp_path):
    (tmp_path / "h200.yaml").write_text("device: H200\nconfigs: {}\n")  # not ours
    with pytest.warns(UserWarning, match="format must be"):
        disp = Dispatcher(H200, [tmp_path])
    assert disp.path is None


def _running(**changed):
    import triton

    from dfgen.kernels.spec import templates_hash

    return dict({"triton": triton.__version__, "templates": templates_hash()}, **changed)


def test_stale_file_serves_unchecked_with_one_warning(tmp_path):
    """Entries tuned with another triton serve if their knobs fit the templates; the
    runtime runs no reference: one warning (when the file is read) names `dfgen check`."""
    write(tmp_path, "h200", {"e": entry(32, BH=2), "f": entry(1024)}, triton="0.0.1")
    with pytest.warns(UserWarning, match=r"tuned with triton 0.0.1 .*`dfgen check`") as caught:
        disp = Dispatcher(H200, [tmp_path])
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no more warnings, whatever is looked up
        choice = disp.choose(Bucket("fwd", "fp32", 64, 32, 2))
        disp.choose(Bucket("fwd", "fp32", 64, 1024, 16))
    assert choice.config.solve["CHUNK"] == 32 and "[e]" in choice.source
    assert disp.stale(disp.data["entries"]["e"]) == [f"triton 0.0.1 (now {_running()['triton']})"]


def test_entry_kept_from_other_templates_is_stale_alone(tmp_path):
    """A current file whose entry a merge kept from older templates (tuned_with): that
    entry makes the one warning, and still serves."""
    old = entry(32, BH=2)
    old["tuned_with"] = {"templates": "0" * 12}
    write(tmp_path, "h200", {"old": old, "new": entry(1024)})
    with pytest.warns(UserWarning, match="templates 000000000000"):
        disp = Dispatcher(H200, [tmp_path])
    assert disp.stale(disp.data["entries"]["new"]) == []
    assert "[old]" in disp.choose(Bucket("fwd", "fp32", 64, 32, 2)).source


@pytest.mark.parametrize("versions,serves", [({}, False), ({"triton": "0.0.1"}, True)])
def test_recorded_check_failure_under_running_versions_makes_the_default_serve(tmp_path, versions,
                                                                                serves):
    """`dfgen check --record` wrote that the entry failed: under the running triton and
    templates the default serves instead; a failure recorded under others is old news."""
    bad = entry(32, BH=2)
    bad["checked"] = dict(_running(**versions), passed=False, result="relative error 3e-3")
    write(tmp_path, "h200", {"bad": bad})
    choice = Dispatcher(H200, [tmp_path]).choose(Bucket("fwd", "fp32", 64, 32, 2))
    assert choice.source.startswith("built-in default") != serves
    if not serves:
        assert "failed `dfgen check`" in choice.source


def test_entry_the_templates_do_not_take_falls_back_with_a_warning(tmp_path):
    """An entry whose knobs fail the running templates' spec (a knob value removed, a
    constraint added): the file stays readable, that bucket gets the default."""
    bad = entry(32, BH=2)
    write(tmp_path, "h200", {"bad": bad})
    path = tmp_path / "h200.yaml"
    path.write_text(path.read_text().replace("CHUNK: 32", "CHUNK: 48"))
    disp = Dispatcher(H200, [tmp_path])
    assert disp.path == path
    with pytest.warns(UserWarning, match="does not fit the running templates.*CHUNK=48"):
        choice = disp.choose(Bucket("fwd", "fp32", 64, 32, 2))
    assert choice.source.startswith("built-in default")


def _valid_file():
    return {"format": tuned_file.FORMAT, "provenance": {"gpu": "h200"}, "entries": {"e": entry(1024)}}


BROKEN = {
    "invalid utf-8": b"format: dfgen-tuned/1\nprovenance: {gpu: \xff}\nentries: {}\n",
    "deep nesting": b"entries: " + b"[" * 10000 + b"]" * 10000 + b"\n",
    "non-string keys": b"format: dfgen-tuned/1\nentries: {}\n1: 2\n",
    "list entries": b"format: dfgen-tuned/1\nentries: [1, 2]\n",
    "fp64": None, "T true": None, "head dim 48": None, "list tuned_with": None,
}


def _broken_bytes(case):
    import yaml

    if BROKEN[case] is not None:
        return BROKEN[case]
    data = _valid_file()
    bad = data["entries"]["e"]
    if case == "fp64":
        bad["dtype"] = "fp64"
    elif case == "T true":
        bad["T"] = True
    elif case == "head dim 48":
        bad["head_dim"] = 48
    else:
        bad["tuned_with"] = ["triton"]
    return yaml.safe_dump(data).encode()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_unreadable_file_of_this_gpu_warns_and_is_skipped(tmp_path, monkeypatch, case):
    """Whatever is wrong with the file that would serve this GPU, it is skipped with one
    warning (the default serves), and DFGEN_STRICT=1 makes it a ConfigError."""
    (tmp_path / "h200.yaml").write_bytes(_broken_bytes(case))
    with pytest.warns(UserWarning, match="ignoring tuned file .*h200.yaml"):
        disp = Dispatcher(H200, [tmp_path])
    assert disp.path is None
    assert disp.choose(Bucket("fwd", "fp32", 64, 1024, 16)).source == "built-in default"
    monkeypatch.setenv("DFGEN_STRICT", "1")
    with pytest.raises(ConfigError, match="h200.yaml"):
        Dispatcher(H200, [tmp_path])


@pytest.mark.parametrize("strict", ["0", "1"])
def test_a_broken_file_of_another_gpu_never_affects_this_one(tmp_path, monkeypatch, strict):
    """The family/compute-capability scan reads other GPUs' files: a broken one there
    neither warns nor (strict) raises for this GPU; it is skipped quietly."""
    monkeypatch.setenv("DFGEN_STRICT", strict)
    for name in ("l4", "a100-sxm4-80gb", "rtx-4090"):
        (tmp_path / f"{name}.yaml").write_bytes(_broken_bytes("deep nesting" if name == "l4" else "fp64"))
    write(tmp_path, "h200", {"e": entry(1024, chunk=16)}, compute_capability="9.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = Dispatcher(H200, [tmp_path])  # exact file: the scan never runs
        by_cc = Dispatcher(H100, [tmp_path])  # scans every file, broken ones included
        nothing = Dispatcher(GpuIdentity("l40s", "l40s", "8.9", 142, "NVIDIA L40S"), [tmp_path])
    assert exact.choose(Bucket("fwd", "fp32", 64, 1024, 16)).config.solve["CHUNK"] == 16
    assert by_cc.choose(Bucket("fwd", "fp32", 64, 1024, 16)).config.solve["CHUNK"] == 16
    assert nothing.path is None


def test_a_broken_file_of_this_gpus_family_still_warns(tmp_path, monkeypatch):
    """A broken file named for this GPU's family would have served it: it warns, and
    strict mode raises."""
    (tmp_path / "h100-pcie.yaml").write_bytes(_broken_bytes("fp64"))
    with pytest.warns(UserWarning, match="h100-pcie.yaml"):
        assert Dispatcher(H100, [tmp_path]).path is None
    monkeypatch.setenv("DFGEN_STRICT", "1")
    with pytest.raises(ConfigError, match="h100-pcie.yaml"):
        Dispatcher(H100, [tmp_path])


def test_deltaformer_attn_survives_an_unreadable_tuned_file(tmp_path, monkeypatch):
    """A call with config=None reads this device's tuned file: a broken one warns and
    the default serves, never an exception out of deltaformer_attn."""
    from conftest import DEVICE
    from dfgen.select import dispatch
    from dfgen.select.gpu import identify
    from dfgen.runtime import deltaformer_attn

    (tmp_path / f"{identify(DEVICE).key}.yaml").write_bytes(_broken_bytes("deep nesting"))
    monkeypatch.setenv("DFGEN_TUNED_DIR", str(tmp_path))
    dispatch.reset()
    q, k, v = (torch.randn(1, 8, 2, 32, device=DEVICE) for _ in range(3))
    try:
        with pytest.warns(UserWarning, match="nested too deeply"):
            out = deltaformer_attn(q, k, v)
        assert torch.equal(out, deltaformer_attn(q, k, v, config=default_config(32, torch.float32)))
    finally:
        dispatch.reset()


def _fwd_entry_with_broken_backward(T=1024, BH=16, head_dim=64):
    fwd = entry(T, BH=BH)
    fwd["head_dim"] = head_dim
    fwd["config"] = dict(default_config(head_dim, torch.float32).to_dict(),
                         solve=fwd["config"]["solve"])
    fwd["config"]["solve_bwd"] = {"CHUNK": 7}  # not checked for a fwd entry
    fwd["config"]["attn_bwd"] = {**fwd["config"]["attn_bwd"], "BOGUS": 1}
    return fwd


def test_a_forward_entry_serves_training_calls_with_valid_backward_sections(tmp_path):
    """A fwd entry may serve a fwd+bwd call (no fwd+bwd entry near): its backward sections
    were never validated, so broken ones are replaced by the default's, never a
    ConfigError out of the call."""
    write(tmp_path, "h200", {"e": _fwd_entry_with_broken_backward()})
    disp = Dispatcher(H200, [tmp_path])
    default = default_config(64, torch.float32)
    train = disp.choose(Bucket("fwd+bwd", "fp32", 64, 1024, 16))
    assert train.config.check(64, backward=True) is train.config
    assert train.config.solve["CHUNK"] == 32  # the entry's forward knobs still serve
    assert train.config.solve_bwd == default.solve_bwd and train.config.attn_bwd == default.attn_bwd
    assert "backward sections from the built-in default" in train.source
    assert disp.choose(Bucket("fwd", "fp32", 64, 1024, 16)).config.solve["CHUNK"] == 32


def test_a_training_call_served_by_a_forward_entry_runs(tmp_path, monkeypatch):
    from conftest import DEVICE
    from dfgen.select import dispatch
    from dfgen.select.gpu import identify
    from dfgen.runtime import deltaformer_attn

    fwd = _fwd_entry_with_broken_backward(T=8, BH=2, head_dim=32)
    fwd["config"]["solve"] = dict(default_config(32, torch.float32).solve, CHUNK=16, BLOCK_N=16,
                                  LOOKAHEAD=1)
    write(tmp_path, identify(DEVICE).key, {"e": fwd})
    monkeypatch.setenv("DFGEN_TUNED_DIR", str(tmp_path))
    dispatch.reset()
    try:
        q, k, v = (torch.randn(1, 8, 2, 32, device=DEVICE, requires_grad=True) for _ in range(3))
        deltaformer_attn(q, k, v).sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    finally:
        dispatch.reset()


def test_the_serving_config_is_logged_once_at_info_and_every_lookup_at_debug(tmp_path, caplog):
    import logging

    write(tmp_path, "h200", {"e": entry(1024)})
    disp = Dispatcher(H200, [tmp_path])
    with caplog.at_level(logging.DEBUG, logger="dfgen"):
        for T in (1024, 1024, 1100, 900):  # one entry serves all four
            disp.choose(Bucket("fwd", "fp32", 64, T, 16))
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(info) == 1 and "[e]" in info[0].getMessage()
    assert len(debug) == 4


def test_a_bucket_key_reads_back_as_its_bucket():
    for bucket in (Bucket("fwd", "bf16", 128, 4096, 16), Bucket("fwd+bwd", "fp32", 64, 1, 512, "qsolve")):
        assert Bucket.from_key(bucket.key) == bucket
    for bad in ("fwd/bf16/d128/t4096", "fwd/bf16/128/t4096/bh16", "fwd/bf16/d128/t4096/bh16/x",
                "fwd/bf16/d96/t4096/bh16", "bwd/bf16/d128/t4096/bh16", "fwd/bf16/d128/t0/bh16", 7):
        with pytest.raises(ConfigError, match="bucket key"):
            Bucket.from_key(bad)
