"""The tuned-file format: round trip, merge, atomic writes, and clear errors."""

import pytest
import yaml

from dfgen.select import tuned_file
from dfgen.kernels.config import default_config
from dfgen.errors import ConfigError


def entry(T=1024, pass_="fwd"):
    return {"pass": pass_, "dtype": "bf16", "head_dim": 64, "T": T, "BH": 16,
            "config": default_config(64).to_dict(), "median_ms": 0.5, "default_ms": 0.6,
            "trials": 10, "failures": 1}


def test_merge_keeps_other_entries_and_sorts(tmp_path):
    path = tmp_path / "h200.yaml"
    tuned_file.merge(path, {"gpu": "h200"}, {"fwd/bf16/d64/t1024/bh16": entry()})
    tuned_file.merge(path, {"gpu": "h200", "date": "x"}, {"fwd/bf16/d64/t2048/bh16": entry(2048)})
    data = tuned_file.read(path)
    assert sorted(data["entries"]) == ["fwd/bf16/d64/t1024/bh16", "fwd/bf16/d64/t2048/bh16"]
    assert data["provenance"] == {"gpu": "h200", "date": "x"}
    text = path.read_text()
    assert text.index("entries:") < text.index("format:") < text.index("provenance:")  # sorted
    assert not list(tmp_path.glob("*.tmp"))


def test_merge_marks_entries_kept_from_other_templates(tmp_path):
    """A re-tune after the templates changed: the kept entries say what they were tuned
    with (the file's provenance now describes the new ones); replaced entries do not, and
    a third merge keeps the oldest record."""
    path = tmp_path / "h200.yaml"
    old, new = "a" * 12, "b" * 12
    tuned_file.merge(path, {"gpu": "h200", "templates": old, "triton": "3.6.0"},
                     {"fwd/bf16/d64/t1024/bh16": entry(), "fwd/bf16/d64/t2048/bh16": entry(2048)})
    tuned_file.merge(path, {"gpu": "h200", "templates": new, "triton": "3.6.0"},
                     {"fwd/bf16/d64/t2048/bh16": entry(2048)})
    entries = tuned_file.read(path)["entries"]
    assert entries["fwd/bf16/d64/t1024/bh16"]["tuned_with"] == {"templates": old}
    assert "tuned_with" not in entries["fwd/bf16/d64/t2048/bh16"]
    tuned_file.merge(path, {"gpu": "h200", "templates": "c" * 12, "triton": "3.7.0"},
                     {"fwd/bf16/d64/t2048/bh16": entry(2048)})
    entries = tuned_file.read(path)["entries"]
    assert entries["fwd/bf16/d64/t1024/bh16"]["tuned_with"] == {"templates": old, "triton": "3.6.0"}


def test_corrupt_and_foreign_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        tuned_file.read(bad)
    bad.write_text(yaml.safe_dump({"format": "vllm/1", "entries": {}}))
    with pytest.raises(ConfigError, match="format must be"):
        tuned_file.read(bad)
    broken = entry()
    broken["config"]["solve"]["CHUNK"] = 7
    bad.write_text(yaml.safe_dump({"format": tuned_file.FORMAT, "entries": {"k": broken}}))
    data = tuned_file.read(bad)  # knobs the templates do not take: readable (the dispatcher skips the entry)
    with pytest.raises(ConfigError, match="entry 'k'.*CHUNK=7"):
        tuned_file.validate(data, str(bad), knobs=True)  # what write() checks
    bad.write_text(yaml.safe_dump({"format": tuned_file.FORMAT, "entries": {"k": {**entry(), "variant": "x"}}}))
    with pytest.raises(ConfigError, match="variant must be"):
        tuned_file.read(bad)
    bad.write_text(yaml.safe_dump({"format": tuned_file.FORMAT, "entries": {"k": {"pass": "fwd"}}}))
    with pytest.raises(ConfigError, match="lacks"):
        tuned_file.read(bad)


def test_write_refuses_invalid_data_and_leaves_the_file(tmp_path):
    path = tmp_path / "h200.yaml"
    tuned_file.merge(path, {}, {"a": entry()})
    before = path.read_text()
    with pytest.raises(ConfigError):
        tuned_file.merge(path, {}, {"b": {**entry(), "T": -1}})
    assert path.read_text() == before


def _file(entries=None, **top):
    return {"format": tuned_file.FORMAT, "provenance": {}, "entries": entries or {}, **top}


UNREADABLE = {
    "invalid utf-8": b"format: dfgen-tuned/1\nentries: {}\nprovenance: {gpu: \xff\xfe}\n",
    "deep nesting": b"entries: " + b"[" * 10000 + b"]" * 10000 + b"\n",
    "non-string top key": yaml.safe_dump({1: 2, **_file()}).encode(),
    "non-string entry key": yaml.safe_dump(_file({"k": {**entry(), 7: 1}})).encode(),
    "non-string knob": yaml.safe_dump(_file({"k": {**entry(), "config": {"solve": {1: 2}}}})).encode(),
    "list entry": yaml.safe_dump(_file({"k": [entry()]})).encode(),
    "list config": yaml.safe_dump(_file({"k": {**entry(), "config": [1]}})).encode(),
    "list section": yaml.safe_dump(_file({"k": {**entry(), "config": {"solve": [1]}}})).encode(),
    "list tuned_with": yaml.safe_dump(_file({"k": {**entry(), "tuned_with": ["x"]}})).encode(),
    "list provenance": yaml.safe_dump({**_file(), "provenance": ["gpu"]}).encode(),
    "unknown dtype": yaml.safe_dump(_file({"k": {**entry(), "dtype": "fp64"}})).encode(),
    "list dtype": yaml.safe_dump(_file({"k": {**entry(), "dtype": ["bf16"]}})).encode(),
    "bool T": yaml.safe_dump(_file({"k": {**entry(), "T": True}})).encode(),
    "float BH": yaml.safe_dump(_file({"k": {**entry(), "BH": 16.0}})).encode(),
    "head dim 48": yaml.safe_dump(_file({"k": {**entry(), "head_dim": 48}})).encode(),
    "list pass": yaml.safe_dump(_file({"k": {**entry(), "pass": ["fwd"]}})).encode(),
    "impossible date": b"format: dfgen-tuned/1\nentries: {}\nprovenance: {date: 2026-13-45}\n",
}
EXPECTED = {"invalid utf-8": "UTF-8", "deep nesting": "nested too deeply",
            "non-string top key": "keys must be strings", "non-string entry key": "keys must be strings",
            "non-string knob": "knob names must be strings", "list entry": "must be a mapping",
            "list config": "must be a mapping", "list section": "must be a mapping",
            "list tuned_with": "tuned_with must be a mapping", "list provenance": "provenance",
            "unknown dtype": "dtype must be one of", "list dtype": "dtype must be one of",
            "bool T": "T must be an integer >= 1", "float BH": "BH must be an integer >= 1",
            "head dim 48": "head_dim must be one of",
            "list pass": "pass must be one of", "impossible date": "ValueError"}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_every_unreadable_file_is_a_config_error_naming_it(tmp_path, case):
    """Whatever is wrong with a file, read() raises ConfigError naming the file and the
    problem: never UnicodeDecodeError, RecursionError, TypeError or AttributeError."""
    path = tmp_path / "h200.yaml"
    path.write_bytes(UNREADABLE[case])
    with pytest.raises(ConfigError, match="h200.yaml") as info:
        tuned_file.read(path)
    assert EXPECTED[case] in str(info.value), str(info.value)
    assert "\n" not in str(info.value)[:300]


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        tuned_file.read(tmp_path / "nope.yaml")


def test_fwd_entries_need_valid_forward_sections_only(tmp_path):
    """validate checks the backward sections of fwd+bwd entries only (the dispatcher makes
    sure a forward entry never serves a training call with broken ones)."""
    fwd = entry()
    fwd["config"]["solve_bwd"] = {"CHUNK": 7}
    tuned_file.validate(_file({"k": fwd}), "x", knobs=True)
    with pytest.raises(ConfigError, match="CHUNK"):
        tuned_file.validate(_file({"k": {**fwd, "pass": "fwd+bwd"}}), "x", knobs=True)


def test_a_float_knob_is_readable_but_never_written(tmp_path):
    """CHUNK: 64.0 would reach the kernels' launch code as a float: read() keeps the file
    usable (the dispatcher gives that entry the default), write() refuses it."""
    data = _file({"k": {**entry(), "config": {
        **entry()["config"], "solve": {**entry()["config"]["solve"], "CHUNK": 64.0}}}})
    path = tmp_path / "h200.yaml"
    path.write_text(yaml.safe_dump(data))
    assert tuned_file.read(path)["entries"]["k"]["config"]["solve"]["CHUNK"] == 64.0
    with pytest.raises(ConfigError, match="CHUNK=64.0"):
        tuned_file.write(tmp_path / "out.yaml", data)


def test_merge_keeps_the_file_mode_and_a_new_file_follows_the_umask(tmp_path):
    """A shared tuned file (group-writable, world-readable) stays so after a merge; a new
    one gets the umask's default mode, not a temporary file's private 0600."""
    import os
    import stat

    shared = tmp_path / "shared.yaml"
    tuned_file.merge(shared, {}, {"a": entry()})
    os.chmod(shared, 0o664)
    tuned_file.merge(shared, {}, {"b": entry(2048)})
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664
    old = os.umask(0o022)
    try:
        tuned_file.merge(tmp_path / "new.yaml", {}, {"a": entry()})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.yaml").stat().st_mode) == 0o644


def test_every_packaged_entry_is_vouched_for_under_the_shipped_templates():
    """A template change must come with its tuned files re-tuned or re-checked on their GPU
    (`dfgen check --record`): otherwise every user of that GPU gets a staleness warning and
    entries nobody has run with the new kernels. Each packaged entry was tuned under the
    shipped templates, or a check under them passed it. (Only the templates: CI's triton
    is not the one a GPU's file was tuned with.)"""
    from dfgen.settings import packaged_dir

    folder = packaged_dir("tuned")
    files = sorted(folder.glob("*.yaml")) if folder is not None else []
    assert files, "no packaged tuned file found"
    for path in files:
        data = tuned_file.read(path)
        for key, item in data["entries"].items():
            running = tuned_file.templates_of(item["pass"])  # decode entries: the decode template's
            tuned = tuned_file.tuned_under(data, item).get("templates")
            checked = item.get("checked") or {}
            assert tuned == running or (checked.get("templates") == running and checked.get("passed") is True), \
                f"{path.name} {key}: tuned with templates {tuned}, not checked under {running}"
