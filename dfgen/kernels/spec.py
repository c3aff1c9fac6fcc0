"""What each kernel template declares: its knobs, their allowed values and constraints.

Each template in templates/ starts with a Jinja comment `{#- dfgen-knobs ... -#}` holding
YAML: the stage name, its knobs (allowed values and a doc line each), constraints (Python
expressions over the knobs and HEAD_DIM) and retired knobs (a knob that was removed, with
the value the code now always has: a config that still sets it to that value is accepted
and the knob dropped). That header is the single source of the search space: configs are
validated against it here, and the tuner samples from it. Rendering is dfgen.kernels.build's.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import ConfigError
from ..settings import packaged_dir

_HEADER = re.compile(r"\{#-?\s*dfgen-knobs\s*\n(.*?)-?#\}", re.S)
STAGES = ("solve_fwd", "attn_fwd", "solve_bwd", "attn_bwd")  # what a KernelConfig configures
DECODE = "decode"  # the decoding step: its own knobs (kernels/decode.py), not a config section
ALL_STAGES = STAGES + (DECODE,)


@functools.lru_cache(maxsize=None)
def templates_dir() -> Path:
    """The kernel templates: dfgen._templates when installed, templates/ in a checkout."""
    found = packaged_dir("templates")
    if found is None or not (found / "solve_fwd.py.jinja").is_file():
        raise FileNotFoundError(f"dfgen's kernel templates are missing (looked in {found}); "
                                "reinstall dfgen")
    return found


NO_DEFAULT = object()  # a knob every config must set


@dataclass(frozen=True)
class Knob:
    name: str
    values: tuple
    doc: str
    abbr: str
    default: Any = NO_DEFAULT  # filled in when a config leaves the knob out (a knob added later)

    def allows(self, value) -> bool:
        """`value` is one of the values, of the same type: 64.0 == 64 and True == 1, but
        64.0 would reach the kernels' launch code (torch.zeros(64.0) fails) and True a
        LOOKAHEAD of 1 by accident, so equal is not enough."""
        return any(_same(value, allowed) for allowed in self.values)

    def type_hint(self, value) -> str:
        """' (a float; expected int)' when `value` equals an allowed value of another type."""
        types = sorted({type(v).__name__ for v in self.values})
        if type(value).__name__ in types:
            return ""
        return f" ({type(value).__name__}; expected {' or '.join(types)})"


@dataclass(frozen=True)
class TemplateSpec:
    stage: str
    path: Path
    doc: str
    knobs: dict[str, Knob]
    constraints: tuple[str, ...]
    retired: Mapping[str, Any] = field(default_factory=dict)  # removed knob -> its fixed value

    def check(self, knobs: Mapping[str, Any], head_dim: int) -> None:
        """Raise ConfigError unless `knobs` names every knob with an allowed value and
        satisfies every constraint at this head dim."""
        if not isinstance(knobs, Mapping):
            raise ConfigError(f"{self.stage}: knobs must be a mapping of knob names to values, "
                              f"got {type(knobs).__name__}")
        bad_names = [n for n in knobs if not isinstance(n, str)]
        if bad_names:
            raise ConfigError(f"{self.stage}: knob names must be strings, got {bad_names!r}")
        for name, fixed in self.retired.items():
            if name in knobs and not _same(knobs[name], fixed):
                raise ConfigError(f"{self.stage}: the knob {name} was removed (the kernel now "
                                  f"always runs as {name}={fixed!r}); got {name}={knobs[name]!r}")
        knobs = self._without_retired(knobs)
        missing = sorted(n for n, k in self.knobs.items() if n not in knobs and k.default is NO_DEFAULT)
        unknown = sorted(set(knobs) - set(self.knobs))
        if missing or unknown:
            raise ConfigError(
                f"{self.stage}: config must set exactly {sorted(self.knobs)} "
                f"(optional: {self.optional()}); missing {missing}, unknown {unknown}")
        knobs = self.complete(knobs)
        for name, knob in self.knobs.items():
            if not knob.allows(knobs[name]):
                raise ConfigError(
                    f"{self.stage}: {name}={knobs[name]!r} is not one of {list(knob.values)}"
                    + knob.type_hint(knobs[name]))
        env = dict(knobs, HEAD_DIM=head_dim)
        for expr in self.constraints:
            if not _eval_constraint(expr, env):
                raise ConfigError(
                    f"{self.stage}: constraint `{expr}` fails for "
                    f"{dict(sorted(knobs.items()))} at HEAD_DIM={head_dim}")

    def optional(self) -> list[str]:
        """The knobs with a default, which a config may leave out."""
        return sorted(n for n, k in self.knobs.items() if k.default is not NO_DEFAULT)

    def complete(self, knobs: Mapping[str, Any]) -> Mapping[str, Any]:
        """`knobs` with every knob it leaves out that has a default set to that default,
        and without retired knobs set to their fixed value (`knobs` itself, not a copy,
        when there is nothing to change: the per-call path)."""
        knobs = self._without_retired(knobs)
        if all(name in knobs for name in self.knobs):
            return knobs
        return {**{n: k.default for n, k in self.knobs.items()
                   if n not in knobs and k.default is not NO_DEFAULT}, **knobs}

    def _without_retired(self, knobs: Mapping[str, Any]) -> Mapping[str, Any]:
        if not any(name in knobs for name in self.retired):
            return knobs
        return {n: v for n, v in knobs.items()
                if not (n in self.retired and _same(v, self.retired[n]))}

    def knob_groups(self) -> list[tuple[str, ...]]:
        """The knobs in groups that the constraints tie together (each in declaration order;
        a knob that no constraint ties to another is a group of its own): the tuner samples
        a group as one choice among its feasible combinations."""
        groups = [{name} for name in self.knobs]
        for expr in self.constraints:
            names = _constraint_names(expr) & set(self.knobs)
            tied = [g for g in groups if g & names]
            if len(tied) > 1:
                groups = [g for g in groups if not g & names] + [set().union(*tied)]
        order = list(self.knobs)
        return sorted((tuple(sorted(g, key=order.index)) for g in groups),
                      key=lambda g: order.index(g[0]))

    def feasible_combinations(self, group: tuple[str, ...], head_dim: int,
                              allowed: Mapping[str, list] | None = None) -> list[tuple]:
        """Every combination of the group's values (or the `allowed` subset) that satisfies
        the constraints over these knobs alone, at this head dim, in declaration order."""
        values = [list((allowed or {}).get(name, self.knobs[name].values)) for name in group]
        exprs = [e for e in self.constraints if _constraint_names(e) & set(group)]
        return [combo for combo in itertools.product(*values)
                if all(_eval_constraint(e, dict(zip(group, combo), HEAD_DIM=head_dim)) for e in exprs)]

    def feasible(self, knobs: Mapping[str, Any], head_dim: int) -> bool:
        try:
            self.check(knobs, head_dim)
        except ConfigError:
            return False
        return True


def _same(value, fixed) -> bool:
    """Equal and of the same type (True is not 1): how a knob value matches."""
    return type(value) is type(fixed) and value == fixed


_ALLOWED_NODES = (ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Name,
                  ast.Load, ast.Constant, ast.And, ast.Or, ast.Not, ast.Add, ast.Sub, ast.Mult,
                  ast.Mod, ast.FloorDiv, ast.Pow, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt,
                  ast.GtE, ast.In, ast.NotIn, ast.Tuple, ast.List, ast.USub)


@functools.lru_cache(maxsize=None)
def _compile_constraint(expr: str):
    tree = ast.parse(expr, mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ConfigError(f"constraint `{expr}` uses {type(node).__name__}, not allowed")
    return compile(tree, "<constraint>", "eval")


@functools.lru_cache(maxsize=None)
def _constraint_names(expr: str) -> frozenset:
    return frozenset(node.id for node in ast.walk(ast.parse(expr, mode="eval"))
                     if isinstance(node, ast.Name)) - {"HEAD_DIM"}


def _eval_constraint(expr: str, env: Mapping[str, Any]) -> bool:
    return bool(eval(_compile_constraint(expr), {"__builtins__": {}}, dict(env)))


def parse_header(text: str, path: Path) -> TemplateSpec:
    match = _HEADER.search(text)
    if not match:
        raise ConfigError(f"{path}: no `{{#- dfgen-knobs ... -#}}` header")
    meta = yaml.safe_load(match.group(1))
    knobs = {name: Knob(name, tuple(spec["values"]), spec.get("doc", ""), spec["abbr"],
                        spec.get("default", NO_DEFAULT))
             for name, spec in meta["knobs"].items()}
    for knob in knobs.values():
        if knob.default is not NO_DEFAULT and knob.default not in knob.values:
            raise ConfigError(f"{path}: the default of {knob.name}, {knob.default!r}, "
                              f"is not one of its values {list(knob.values)}")
    retired = dict(meta.get("retired") or {})
    if set(retired) & set(knobs):
        raise ConfigError(f"{path}: knobs {sorted(set(retired) & set(knobs))} are both "
                          "declared and retired")
    return TemplateSpec(stage=meta["stage"], path=path, doc=meta.get("doc", ""), knobs=knobs,
                        constraints=tuple(meta.get("constraints", ())), retired=retired)


def _template_path(stage: str) -> Path:
    if stage not in ALL_STAGES:
        raise ConfigError(f"stage must be one of {list(ALL_STAGES)}, got {stage!r}")
    return templates_dir() / f"{stage}.py.jinja"


@functools.lru_cache(maxsize=None)
def spec(stage: str) -> TemplateSpec:
    path = _template_path(stage)
    return parse_header(path.read_text(), path)


@functools.lru_cache(maxsize=None)
def templates_hash(stages: tuple[str, ...] = STAGES) -> str:
    """Hash of the text of `stages`' templates and every shared part (the `_*.jinja` files
    they may include): part of cache paths and tuned-file provenance. The default, the
    stages a KernelConfig configures, is what tuned entries record, so that a change to
    another stage's template (decode) does not make them stale."""
    names = {f"{stage}.py.jinja" for stage in stages}
    digest = hashlib.sha256()
    for path in sorted(templates_dir().glob("*.jinja")):
        if path.name.startswith("_") or path.name in names:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
