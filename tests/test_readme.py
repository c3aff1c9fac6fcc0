"""The README's runnable examples (Quickstart, Generate) run as a newcomer runs them: each
block in a fresh Python process, from a folder outside the checkout, against the installed
package, printing the error it promises to keep small."""

import re
import subprocess
import sys
import tempfile

import pytest

from conftest import CHECKOUT


def _block(heading: str) -> str:
    """The first ```python block under `heading` in the README."""
    text = (CHECKOUT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("heading,printed", [("Quickstart", "relative error"),
                                             ("Generate", "relative difference")])
def test_readme_example_runs(heading, printed):
    code = _block(heading)
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True,
                             text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if printed in l)
    assert float(line.split()[-1]) < 2e-2, line
