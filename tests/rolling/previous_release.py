"""The previous release of the rolling-upgrade tests, and its source tree.

There are no release tags yet, so "the previous release" is one commit of main,
named here and nowhere else:

``bfb508b`` (the merge of ordering keys on Redis and MongoDB, 2026-12-04) is the
last commit before the newest migration of the SQL engines: the next one, the
inbox (fe3355b), took SQLite from schema 6 to 7 and PostgreSQL from 7 to 8. It is
also before MongoDB stopped keeping the seed's 30-day TTL index on dead letters
(4d4759e: a connect drops it, and this release creates it again). The Redis
key layout (4) and the MongoDB layout (3) are the same in both: those engines
show the two releases side by side on one layout, the SQL engines across a
migration. A later commit (the end of issue 15, say) would have today's schema
on every engine and show nothing of a migration; an earlier one (before
services, the last change of the Redis and MongoDB layouts) would run a release
whose records know no service, which no deployment upgrading today runs.

``source_tree()`` extracts the release's ``src`` with ``git archive`` into a
directory of the test session: a subprocess with ``PYTHONPATH=<that>/src`` runs
it. A shallow clone is deepened from its origin first; without the commit the
tests skip, or fail when CI=true.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

__all__ = ["PREVIOUS_RELEASE", "repository", "source_tree"]

#: the commit of main the tests run as the previous release (see above)
PREVIOUS_RELEASE = "bfb508b70eb2ef0fe0a7f37c88390b1846c013b9"


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=60, check=False)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the previous release cannot be run: {reason}", pytrace=False)
    pytest.skip(f"the previous release cannot be run: {reason}")


def repository() -> Path:
    """The root of the git work tree these tests are in (skips without one)."""
    here = Path(__file__).resolve().parent
    found = _git("rev-parse", "--show-toplevel", cwd=here)
    if found.returncode != 0:
        _unavailable("the tests are not in a git work tree")
    return Path(found.stdout.decode().strip())


def source_tree(directory: Path) -> Path:
    """The previous release's ``src`` extracted into ``directory`` (once), its path."""
    src = directory / "src"
    if (src / "retrybus" / "__init__.py").exists():
        return src
    root = repository()
    archive = _git("archive", "--format=tar", PREVIOUS_RELEASE, "src", cwd=root)
    shallow = _git("rev-parse", "--is-shallow-repository", cwd=root).stdout.decode().strip()
    if archive.returncode != 0 and shallow == "true":
        # a shallow clone (as some CI checkouts are): its origin has the history
        _git("fetch", "--quiet", "--unshallow", cwd=root)
        archive = _git("archive", "--format=tar", PREVIOUS_RELEASE, "src", cwd=root)
    if archive.returncode != 0:
        why = "a shallow clone" if shallow == "true" else archive.stderr.decode().strip()
        _unavailable(f"commit {PREVIOUS_RELEASE[:12]} is not in {root} ({why})")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(directory, filter="data")
    return src
