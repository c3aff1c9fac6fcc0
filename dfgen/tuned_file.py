"""The tuned/<gpu>.yaml format: one module that the tuner writes and the runtime reads.

    format: dfgen-tuned/1
    provenance: {gpu, device, compute_capability, sm_count, torch, triton, dfgen,
                 templates, date}
    entries:
      <bucket key>:            e.g. fwd/bf16/d128/t4096/bh16
        pass: fwd | fwd+bwd
        dtype: bf16
        head_dim: 128
        T: 4096                the bucket's sequence length
        BH: 16                 the bucket's batch * heads
        config: {strategy, solve, attn, solve_bwd, attn_bwd}
        median_ms: ...         tuned config's median time at the bucket's shape
        default_ms: ...        the built-in default's, measured in the same study
        trials: ...            trials run (failed ones included)
        failures: ...
        variant: qsolve        optional: the case the entry was tuned for (qsolve: a
                               solve stage with its own queries, two-stage path)
        tuned_with: {templates, triton, torch}
                               optional: set on an entry kept by a merge whose provenance
                               differs from the one it was tuned under (the provenance
                               then describes the newer entries); when its templates
                               or triton differ from the running ones it is validated
                               before first use, like a whole stale file's entries

Read with yaml.safe_load and checked against this schema; written atomically (temporary
file, then rename) and merged with what is already there, keys sorted for clean diffs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from .config import SUPPORTED_HEAD_DIMS, KernelConfig
from .errors import ConfigError
from .files import atomic_write_text, read_yaml

FORMAT = "dfgen-tuned/1"
PASSES = ("fwd", "fwd+bwd")
_ENTRY_KEYS = {"pass", "dtype", "head_dim", "T", "BH", "config", "median_ms", "default_ms",
               "trials", "failures", "variant", "tuned_with"}
_CARRIED = ("templates", "triton", "torch")  # provenance that can make an entry stale
VARIANTS = ("", "qsolve")
DTYPES = ("bf16", "fp16", "fp32")


def bucket_key(pass_: str, dtype: str, head_dim: int, T: int, BH: int, variant: str = "") -> str:
    return f"{pass_}/{dtype}/d{head_dim}/t{T}/bh{BH}" + (f"/{variant}" if variant else "")


def empty() -> dict:
    return {"format": FORMAT, "provenance": {}, "entries": {}}


def _string_keys(mapping: Mapping, where: str) -> None:
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: keys must be strings, got {bad[0]!r}")


def validate(data: Any, source: str) -> dict:
    """Raise ConfigError naming `source` and the problem unless `data` is a tuned file."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a tuned file must be a mapping, got {type(data).__name__}")
    _string_keys(data, source)
    if data.get("format") != FORMAT:
        raise ConfigError(f"{source}: format must be {FORMAT!r}, got {data.get('format')!r}")
    if not isinstance(data.get("provenance", {}), Mapping):
        raise ConfigError(f"{source}: provenance must be a mapping")
    _string_keys(data.get("provenance", {}), f"{source}: provenance")
    entries = data.get("entries")
    if not isinstance(entries, Mapping):
        raise ConfigError(f"{source}: entries must be a mapping")
    _string_keys(entries, f"{source}: entries")
    for key, entry in entries.items():
        where = f"{source}: entry {key!r}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping")
        _string_keys(entry, where)
        missing = {"pass", "dtype", "head_dim", "T", "BH", "config"} - set(entry)
        if missing:
            raise ConfigError(f"{where} lacks {sorted(missing)}")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(f"{where} has unknown fields {sorted(unknown)}")
        if entry["pass"] not in PASSES:
            raise ConfigError(f"{where}: pass must be one of {PASSES}")
        if entry.get("variant", "") not in VARIANTS:
            raise ConfigError(f"{where}: variant must be one of {VARIANTS}")
        if entry["dtype"] not in DTYPES:
            raise ConfigError(f"{where}: dtype must be one of {DTYPES}, got {entry['dtype']!r}")
        for field in ("head_dim", "T", "BH"):  # bool is an int: true is no T
            if type(entry[field]) is not int or entry[field] < 1:
                raise ConfigError(f"{where}: {field} must be a positive integer, got {entry[field]!r}")
        if entry["head_dim"] not in SUPPORTED_HEAD_DIMS:
            raise ConfigError(f"{where}: head_dim must be one of {SUPPORTED_HEAD_DIMS}, "
                              f"got {entry['head_dim']}")
        if not isinstance(entry.get("tuned_with", {}), Mapping):
            raise ConfigError(f"{where}: tuned_with must be a mapping")
        _string_keys(entry.get("tuned_with", {}), f"{where}: tuned_with")
        try:
            KernelConfig.from_dict(entry["config"]).check(
                entry["head_dim"], backward=entry["pass"] == "fwd+bwd")
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return dict(data)


def read(path: str | os.PathLike) -> dict:
    """The validated contents of a tuned file. Whatever makes a file unusable (missing,
    unreadable, not UTF-8, not YAML, nested too deeply, corrupt or foreign) is a one-line
    ConfigError naming the file: callers skip it or report it, never crash on it."""
    path = Path(path)
    data = read_yaml(path)  # ConfigError naming the file if it is not readable YAML
    try:
        return validate(data, str(path))
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a tuned file") from None
    except Exception as err:  # noqa: BLE001 - any other defect: the file is unusable
        raise ConfigError(f"{path}: unreadable ({type(err).__name__}: {_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def write(path: str | os.PathLike, data: Mapping) -> None:
    """Atomically replace `path` with `data` (validated first)."""
    path = Path(path)
    validate(data, str(path))
    atomic_write_text(path, yaml.safe_dump(dict(data), sort_keys=True, default_flow_style=False))


def merge(path: str | os.PathLike, provenance: Mapping, entries: Mapping[str, Mapping]) -> dict:
    """Add or replace `entries` in the file at `path` (created if missing), keeping every
    other entry; the provenance becomes `provenance`, and a kept entry tuned under other
    templates, triton or torch records those in its `tuned_with`. Returns what was written.
    Processes merging into one file at once take turns (a lock file beside it)."""
    from filelock import FileLock  # the tuner's, not the runtime's, import

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        data = read(path) if path.exists() else empty()
        old = data.get("provenance", {})
        changed = {k: old[k] for k in _CARRIED
                   if old.get(k) is not None and str(old[k]) != str(provenance.get(k))}
        merged = {}
        for key, entry in data["entries"].items():
            if changed:  # an earlier tuned_with (the older truth) wins
                entry = dict(entry, tuned_with=dict(changed, **entry.get("tuned_with", {})))
            merged[key] = entry
        merged.update({key: dict(entry) for key, entry in entries.items()})
        out = {"format": FORMAT, "provenance": dict(provenance), "entries": merged}
        write(path, out)
    return out
