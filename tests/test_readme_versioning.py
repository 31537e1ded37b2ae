"""The README's versioning example runs as pasted and prints what the README says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def example() -> str:
    text = README.read_text(encoding="utf-8")
    block = text.split("```python\n# versioning example\n", 1)[1]
    return block.split("```", 1)[0]


def test_the_versioning_example_runs_as_pasted(tmp_path: Path) -> None:
    script = tmp_path / "versioning.py"
    script.write_text(example(), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "3 post_id=7 user_id=None source='web'",
        "3 post_id=8 user_id=None source='web'",
        "invalid like.added v3 data: post_id: Input should be a valid integer, unable to "
        "parse string as an integer (got 'seven')",
    ]
