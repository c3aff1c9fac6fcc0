"""The tuned/<gpu>.yaml format: one module that the tuner writes and the runtime reads.

    format: dfgen-tuned/1
    provenance: {gpu, device, compute_capability, sm_count, torch, triton, dfgen,
                 templates, date}
    entries:
      <bucket key>:            e.g. fwd/bf16/d128/t4096/bh16, decode/bf16/d128/t8192/bh128
        pass: fwd | fwd+bwd | decode
        dtype: bf16
        head_dim: 128
        T: 4096                the bucket's sequence length (decode: the cache's length)
        BH: 16                 the bucket's batch * heads (decode: batch * query heads)
        config: {strategy, solve, attn, solve_bwd, attn_bwd}
                               a decode entry: {decode: {BLOCK_M, BLOCK_N, ...}}, the
                               knobs of templates/decode.py.jinja (any left out: the
                               built-in default's)
        median_ms: ...         tuned config's median time at the bucket's shape, end to
                               end (the pass, every stage of it; decode: one step)
        default_ms: ...        the built-in default's, measured in the same tune
        trials: ...            trials of the bucket's stage studies (failed ones included)
        failures: ...          failed ones of them (cut at the time limit not counted)
        variant: qsolve        optional: the case the entry was tuned for (qsolve: a
                               solve stage with its own queries, two-stage path)
        tuned_with: {templates, triton, torch}
                               optional: set on an entry kept by a merge whose provenance
                               differs from the one it was tuned under (the provenance
                               then describes the newer entries)
        checked: {templates, triton, torch, passed, result, date}
                               optional: what `dfgen check --record` found when it ran
                               the entry against the reference under these versions

An entry is stale when the templates or triton it was tuned with (its tuned_with, else
the file's provenance) differ from the running ones. The provenance's `templates` hashes
the templates a KernelConfig configures; a decode entry's tuned_with always records the
hash of the decode template (templates_of), so that each kind goes stale with its own.
The runtime never runs the reference: a stale entry serves if its knobs pass the
templates' spec (one warning names `dfgen check`), unless a check recorded under the
running versions failed it.

Read with yaml.safe_load and checked against this schema (an entry's knobs are checked
against the templates' spec when it is written, and by the dispatcher when it is used:
templates change, the file stays readable); written atomically (temporary file, then
rename) and merged with what is already there, keys sorted for clean diffs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import ConfigError
from ..files import atomic_write_text, read_yaml
from ..kernels.config import KernelConfig
from ..kernels.decode import decode_knobs
from ..kernels.spec import DECODE, templates_hash
from ..settings import torch_dtype
from .bucket import Bucket

FORMAT = "dfgen-tuned/1"
_ENTRY_KEYS = {"pass", "dtype", "head_dim", "T", "BH", "config", "median_ms", "default_ms",
               "trials", "failures", "variant", "tuned_with", "checked"}
_CARRIED = ("templates", "triton", "torch")  # provenance that can make an entry stale
STALE_WHEN = ("templates", "triton")  # what, when it differs from the running one, makes an entry stale


def empty() -> dict:
    return {"format": FORMAT, "provenance": {}, "entries": {}}


def _string_keys(mapping: Mapping, where: str) -> None:
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: keys must be strings, got {bad[0]!r}")


def validate(data: Any, source: str, knobs: bool = False) -> dict:
    """Raise ConfigError naming `source` and the problem unless `data` is a tuned file;
    with `knobs`, also unless every entry's config passes the running templates' spec."""
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
        if "config" not in entry:
            raise ConfigError(f"{where} lacks ['config']")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(f"{where} has unknown fields {sorted(unknown)}")
        bucket = Bucket.from_fields(entry, where)
        if not isinstance(entry.get("tuned_with", {}), Mapping):
            raise ConfigError(f"{where}: tuned_with must be a mapping")
        _string_keys(entry.get("tuned_with", {}), f"{where}: tuned_with")
        if not isinstance(entry.get("checked", {}), Mapping):
            raise ConfigError(f"{where}: checked must be a mapping")
        try:
            if bucket.decode:
                given = decode_section(entry["config"])
                if knobs:
                    decode_knobs(given, bucket.head_dim, torch_dtype(bucket.dtype))
            else:
                config = KernelConfig.from_dict(entry["config"])
                if knobs:
                    config.check(bucket.head_dim, backward=bucket.backward)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return dict(data)


def decode_section(config: Any) -> dict:
    """The knobs of a decode entry's config ({decode: {knob: value}}), checked for form only
    (a mapping of names to scalars: whether the template takes them is decode_knobs's
    question, asked where the entry is used); ConfigError otherwise."""
    if not isinstance(config, Mapping) or set(config) != {DECODE}:
        raise ConfigError(f"a decode entry's config must be {{decode: {{knob: value, ...}}}}, "
                          f"got {_short(config)}")
    knobs = config[DECODE]
    if not isinstance(knobs, Mapping):
        raise ConfigError(f"decode: knobs must be a mapping of knob names to values, got "
                          f"{type(knobs).__name__}")
    _string_keys(knobs, "decode")
    for name, value in knobs.items():
        if not isinstance(value, (bool, int, float, str)):  # as a KernelConfig's knobs
            raise ConfigError(f"decode: {name} must be a number, boolean or string, got "
                              f"{type(value).__name__}")
    return dict(knobs)


def _short(value: Any) -> str:
    return _one_line(repr(value))[:80] if isinstance(value, (str, int, float, bool)) or value is None \
        else f"a {type(value).__name__}" + (f" with keys {sorted(map(str, value))[:6]}"
                                            if isinstance(value, Mapping) else "")


def templates_of(pass_: str) -> str:
    """The templates hash that entries of a pass are tuned under and go stale against: the
    decode template's (with the shared parts) for decode entries, the KernelConfig stages'
    for the others (a change to one kind's template leaves the other kind's entries current)."""
    return templates_hash((DECODE,)) if pass_ == DECODE else templates_hash()


def tuned_under(data: Mapping, entry: Mapping) -> dict:
    """The versions an entry was tuned under: its tuned_with over the file's provenance."""
    return {**{k: v for k, v in data.get("provenance", {}).items() if k in _CARRIED},
            **entry.get("tuned_with", {})}


def differences(versions: Mapping, running: Mapping) -> list[str]:
    """What of `versions` (STALE_WHEN only) differs from `running`: ['triton 3.5.0 (now 3.6.0)']."""
    return [f"{name} {versions[name]} (now {running[name]})" for name in STALE_WHEN
            if versions.get(name) is not None and str(versions[name]) != str(running[name])]


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


def write(path: str | os.PathLike, data: Mapping, knobs: bool = True) -> None:
    """Atomically replace `path` with `data`, validated first (with `knobs`, every entry's
    knobs against the running templates too)."""
    path = Path(path)
    validate(data, str(path), knobs=knobs)
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


def record_checks(path: str | os.PathLike, checked: Mapping[str, Mapping]) -> None:
    """Set the `checked` field of the entries named in `checked` ({entry key: record}) in
    the file at `path`, keeping everything else (under the merge's lock)."""
    from filelock import FileLock

    path = Path(path)
    with FileLock(path.with_name(path.name + ".lock")):
        data = read(path)
        entries = dict(data["entries"])
        for key, record in checked.items():
            if key in entries:
                entries[key] = dict(entries[key], checked=dict(record))
        # entries whose knobs the running templates do not take keep their record too
        write(path, dict(data, entries=entries), knobs=False)
