"""The README's Quick start runs as pasted: a newcomer who copies it sees it work."""

from __future__ import annotations

from pathlib import Path

from readme_examples import README, run_script


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_quick_start_runs_as_pasted(tmp_path: Path) -> None:
    done = run_script(quick_start(), tmp_path)
    lines = done.stdout.splitlines()
    assert lines[0] == "('SocialStatisticsHandler',) () ()"
    assert "PAGE: CommentNotificationHandler: non-retryable: PermanentError" in lines
    assert lines[-1] == "1"
    # logging is set up, so the dead letter is in the log as it happens
    assert "dead-lettered event" in done.stderr
    assert (tmp_path / "retrybus.db").exists()
