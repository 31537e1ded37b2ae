"""The README's Python examples, found and run as a newcomer pastes them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def example(marker: str) -> str:
    """The README's Python block that starts with ``# <marker>``."""
    text = README.read_text(encoding="utf-8")
    for block in text.split("```python\n")[1:]:
        code = block.split("```", 1)[0]
        if code.startswith(f"# {marker}\n"):
            return code
    raise AssertionError(f"no README example marked {marker!r}")


def run_script(
    code: str,
    directory: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a script in ``directory`` with this interpreter (its
    environment ``env``; None: this one's), asserting it exits 0."""
    script = directory / "example.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else dict(env),
    )
    assert done.returncode == 0, done.stderr
    return done
