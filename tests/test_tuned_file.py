"""The tuned-file format: round trip, merge, atomic writes, and clear errors."""

import pytest
import yaml

from dfgen import tuned_file
from dfgen.config import default_config
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
    with pytest.raises(ConfigError, match="entry 'k'.*CHUNK=7"):
        tuned_file.read(bad)
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
