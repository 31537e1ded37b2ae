"""``process_worker.py`` with retrybus's log on stderr.

    python tests/apps/logging_worker.py (--db PATH | --store URL) --record PATH [options]

Same arguments and behaviour as ``process_worker.py``; it only configures logging
first (INFO and up, to stderr), because the library's logger has a NullHandler
and would otherwise print nothing, so that a test can read what the worker says
about the store (``store unavailable, retrying in …``, ``store … is back``).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import process_worker  # its directory is sys.path[0] when run as a script

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    sys.exit(asyncio.run(process_worker.main(process_worker.parse_args(sys.argv[1:]))))
