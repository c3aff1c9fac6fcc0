"""The package's structure: layers that import only downward, no import cycle, and a
runtime path that never reaches the tuner, the CLI, optuna or the reference checks, even
when a tuned entry is stale.

The layers, lowest first (a module may import its own layer's modules and lower ones):
    0  dfgen.version, errors, files, settings, reference
    1  dfgen.kernels
    2  dfgen.select
    3  dfgen.api, dfgen.runtime, dfgen.layers, dfgen (the package's exports)
    4  dfgen.tools, dfgen.__main__
Every import counts: at module top and inside functions (a lazy import still runs)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dfgen

PACKAGE = Path(dfgen.__file__).resolve().parent
LAYERS = {
    "dfgen.version": 0, "dfgen.errors": 0, "dfgen.files": 0, "dfgen.settings": 0,
    "dfgen.reference": 0,
    "dfgen.kernels": 1,
    "dfgen.select": 2,
    "dfgen.api": 3, "dfgen.runtime": 3, "dfgen.layers": 3, "dfgen": 3,
    "dfgen.tools": 4, "dfgen.__main__": 4,
}
# what the runtime path must never import
NEVER_AT_RUNTIME = ("optuna", "dfgen.tools", "dfgen.reference")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "_templates" not in p.parts}


def layer_of(name: str) -> int:
    """The layer of a dfgen module: its longest prefix in LAYERS."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    raise AssertionError(f"{name} is in no layer: add it to LAYERS (and to the docstring)")


def dfgen_imports(name: str, path: Path) -> set[str]:
    """The dfgen modules that `name` imports anywhere in its code (relative imports resolved;
    `from X import y` counts X.y when that is a module, else X)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dfgen")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dfgen":
                continue
            known = modules()
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t in dfgen_imports(name, path) if t != name} for name, path in known.items()}


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_point_down_or_sideways():
    upward = [f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
              for src, targets in import_graph().items() for dst in sorted(targets)
              if layer_of(dst) > layer_of(src)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the path, 2 done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a kernels module importing the dispatcher is reported."""
    fake = tmp_path / "dfgen"
    (fake / "kernels").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "kernels" / "__init__.py").write_text("")
    (fake / "kernels" / "bad.py").write_text("def f():\n    from ..select import dispatch\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert dfgen_imports("dfgen.kernels.bad", fake / "kernels" / "bad.py") == {"dfgen.select"}
    with pytest.raises(AssertionError, match="dfgen.kernels.bad .layer 1. imports dfgen.select"):
        test_imports_point_down_or_sideways()


def test_runtime_path_never_reaches_tools_reference_or_optuna(tmp_path):
    """A forward and a backward call through deltaformer_attn, with a stale tuned entry
    serving (tuned with other templates and triton): the entry's knobs serve, one warning
    names `dfgen check`, and nothing of the tools, the reference or optuna is imported."""
    import torch

    from dfgen.select.gpu import gpu_key

    on_gpu = torch.cuda.is_available()  # the GPU where there is one, else the interpreter
    key = gpu_key(torch.cuda.get_device_name()) if on_gpu else "cpu-interpreter"
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    entry_config = {"strategy": "fused", "solve": {"CHUNK": 16, "BLOCK_N": 16, "LOOKAHEAD": 1,
                    "INV_FP16": False, "SOLVE_PRECISION": "ieee", "num_warps": 4, "num_stages": 2}}
    (tuned / f"{key}.yaml").write_text(json.dumps({
        "format": "dfgen-tuned/1",
        "provenance": {"gpu": key, "triton": "0.0.1", "templates": "000000000000"},
        "entries": {"fwd+bwd/fp32/d32/t40/bh2": {"pass": "fwd+bwd", "dtype": "fp32", "head_dim": 32,
                                                  "T": 40, "BH": 2, "config": entry_config}}}))
    code = f"""
import sys, warnings, torch
from dfgen.runtime import deltaformer_attn
from dfgen.select.bucket import Bucket
from dfgen.select.dispatch import dispatcher_for
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q, k, v = (torch.randn(1, 40, 2, 32, device="{'cuda' if on_gpu else 'cpu'}", requires_grad=True)
               for _ in range(3))
    deltaformer_attn(q, k, v).sum().backward()
    choice = dispatcher_for(q.device).choose(Bucket("fwd+bwd", "fp32", 32, 40, 2))
print(sorted(m for m in sys.modules if m.split(".")[0] == "optuna" or m.startswith(("dfgen.tools", "dfgen.reference"))))
print(choice.source)
print(choice.config.solve["CHUNK"])
print(sum("dfgen check" in str(w.message) for w in caught))
"""
    env = dict(os.environ, DFGEN_TUNED_DIR=str(tuned), DFGEN_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_INTERPRET="0" if on_gpu else "1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    imported, source, chunk, warned = out.stdout.strip().splitlines()
    assert imported == "[]", f"the runtime path imported {imported}"
    assert not source.startswith("built-in default") and "[fwd+bwd/fp32/d32/t40/bh2]" in source
    assert chunk == "16"
    assert warned == "1"
