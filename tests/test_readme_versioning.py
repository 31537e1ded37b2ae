"""The README's versioning example runs as pasted and prints what the README says."""

from __future__ import annotations

from pathlib import Path

from readme_examples import example, run_script


def test_the_versioning_example_runs_as_pasted(tmp_path: Path) -> None:
    done = run_script(example("versioning example"), tmp_path)
    assert done.stdout.splitlines() == [
        "3 post_id=7 user_id=None source='web'",
        "3 post_id=8 user_id=None source='web'",
        "invalid like.added v3 data: post_id: Input should be a valid integer, unable to "
        "parse string as an integer (got 'seven')",
    ]
