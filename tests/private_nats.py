"""A private ``nats-server`` with JetStream, for the tests that restart their broker.

    with PrivateNats() as server:           # 127.0.0.1:<free port>, data in a temp dir
        ... server.url ...                  # nats://127.0.0.1:PORT?stream=RETRYBUS
        server.restart(pause=0.5)           # SIGTERM, wait, start on the same -sd

The machine's shared server (4222) is never touched.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from engines._common import unavailable
from private_servers import _ChildProcessServer, _wait, port_answers

NATS_SERVER = "/usr/sbin/nats-server"


class PrivateNats(_ChildProcessServer):
    """``nats-server -js`` as our child process: SIGTERM stops it cleanly
    (``fast``), SIGKILL at once (``immediate``); restarts keep its store directory."""

    kind = "nats"

    def __init__(self, stream: str = "RETRYBUS") -> None:
        self.binary = NATS_SERVER if Path(NATS_SERVER).exists() else shutil.which("nats-server")
        self.what = "a private NATS server"
        if self.binary is None:
            unavailable(self.what, f"no nats-server ({NATS_SERVER})")
        self.stream = stream
        self.proc: subprocess.Popen[bytes] | None = None
        super().__init__()
        self.what = f"a private NATS server on 127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}?stream={self.stream}"

    def _start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen(
            [
                self.binary,
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.directory / "store"),
                "-l",
                str(self.directory / "server.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(
            lambda: self.proc is not None and (self.proc.poll() is not None or self._ready()),
            f"{self.what} answers",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.what} did not start:\n{self.log()}")

    def _ready(self) -> bool:
        return port_answers(self.port) and "Server is ready" in self.log()
