"""The wheel holds everything the source tree has: every module of dfgen/ (subpackages
found, never listed by hand), the templates and the shipped tuned files. And the package
the tests import is the installed one, with its templates inside it."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import dfgen
from dfgen.kernels import spec as templating

SRC = Path(__file__).resolve().parent.parent  # the checkout these tests come from


def _source_files() -> set[str]:
    """What the wheel must hold, as paths inside it."""
    files = {str(p.relative_to(SRC)) for p in (SRC / "dfgen").rglob("*.py")
             if "__pycache__" not in p.parts}
    files |= {f"dfgen/_templates/{p.name}" for p in (SRC / "templates").glob("*.jinja")}
    files |= {f"dfgen/_tuned/{p.name}" for p in (SRC / "tuned").glob("*.yaml")}
    return files


def _setuptools_major() -> int:
    if importlib.util.find_spec("setuptools") is None:
        return 0
    from importlib.metadata import version

    return int(version("setuptools").split(".")[0])


def test_the_wheel_holds_every_module_template_and_tuned_file(tmp_path):
    # the environment's own setuptools when it is recent enough (no download), else pip's
    # isolated build
    isolation = ["--no-build-isolation"] if _setuptools_major() >= 64 else []
    # from a copy: setuptools leaves build/ in the tree it builds, and a later build there
    # would take modules since deleted from it
    source = tmp_path / "src"
    shutil.copytree(SRC, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".dev", ".whl", "gpu-logs"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("dfgen-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_files() - held)
    assert not missing, f"the wheel lacks {missing}"
    assert "dfgen/tools/tuning/tuner.py" in held  # the module a hand-written list once left out
    assert not [name for name in held if name.startswith("dfgen/tuning/")], \
        "the wheel holds modules that are gone (a stale build/ folder in the checkout?)"


def test_the_imported_package_has_every_source_module():
    """Run against an installed package (CI), the modules it has are the source tree's."""
    where = Path(dfgen.__file__).resolve().parent
    have = {str(p.relative_to(where.parent)) for p in where.rglob("*.py") if "__pycache__" not in p.parts}
    wanted = {f for f in _source_files() if f.endswith(".py")}
    assert not sorted(wanted - have), f"{where} lacks {sorted(wanted - have)}"
    assert (templating.templates_dir() / "solve_fwd.py.jinja").is_file()
