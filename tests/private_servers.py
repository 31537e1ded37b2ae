"""Private database servers for the tests that stop and restart their engine.

The suite shares the machine's PostgreSQL (5432) and Redis (6379) with the rest
of the tests and with whoever else uses the machine; a test that restarts a
server must never touch those. Each class here starts a server of its own, on
127.0.0.1 and a free port, with its data in a temporary directory, and removes
it all again (process killed, directory deleted) when its ``with`` block ends,
whether the test passed or not:

    with PrivatePostgres() as pg:       # initdb + pg_ctl, as user postgres when root
        ... pg.url ...                  # postgresql://postgres@127.0.0.1:PORT/postgres
        pg.restart(pause=0.5)           # stop (fast), wait, start on the same data and port

    with PrivateRedis(persistent=True) as redis:   # redis-server (AOF when persistent)
    with PrivateSecantus() as mongo:               # SecantusDB in a process of its own

``stop(mode)``, ``start()`` and ``restart(pause, mode)`` act on that instance
only. ``mode`` is ``"fast"`` (a clean shutdown: PostgreSQL's fast mode, SIGTERM
to Redis and SecantusDB) or ``"immediate"`` (PostgreSQL's immediate mode, which
recovers from its WAL on the next start; SIGKILL to the others). When a server's
binaries are missing the test is skipped with the reason (failed with CI=true).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from engines._common import unavailable

READY_TIMEOUT = 30.0  # seconds a server may take to answer


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait(condition: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.05)


def _run(command: list[str], what: str, timeout: float = 120.0) -> None:
    """Run a command to completion, raising with its output when it fails. Its
    output goes to a file, not a pipe: a daemon it starts must not hold our pipe open."""
    with tempfile.TemporaryFile() as output:
        try:
            code = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
        if code != 0:
            output.seek(0)
            text = output.read().decode(errors="replace")
            raise RuntimeError(f"{what} failed ({code}): {' '.join(command)}\n{text}")


class PrivateServer:
    """A server of the test's own: ``url``, ``stop``, ``start``, ``restart``; a context manager."""

    what = "a private server"
    kind = "server"  # names its temporary directory

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix=f"retrybus-{self.kind}-"))
        self.running = False
        self.restarts = 0

    @property
    def url(self) -> str:
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self, mode: str) -> None:
        raise NotImplementedError

    def _kill(self) -> None:
        """Make sure no process of this server is left (teardown, even after errors)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the server (again) on the same data directory and port; returns once it answers."""
        self._start()
        _wait(lambda: port_answers(self.port), f"{self.what} answers on port {self.port}")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Shut this instance down (``fast`` or ``immediate``); returns once it is gone."""
        if mode not in ("fast", "immediate"):
            raise ValueError(f"mode must be 'fast' or 'immediate', got {mode!r}")
        self.running = False
        self._stop(mode)

    def restart(self, pause: float = 0.5, mode: str = "fast") -> None:
        """Stop, stay down ``pause`` seconds, start again."""
        self.stop(mode)
        time.sleep(pause)
        self.start()
        self.restarts += 1

    def close(self) -> None:
        """Kill the server and remove its directory."""
        try:
            if self.running:
                with contextlib.suppress(Exception):
                    self._stop("immediate")
            self._kill()
        finally:
            self.running = False
            shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        """The server's own log, for failure messages."""
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# PostgreSQL ---------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin that has initdb (else initdb on PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


class PrivatePostgres(PrivateServer):
    """A PostgreSQL cluster made by ``initdb`` in a temporary directory (trust auth,
    fsync off, listening on 127.0.0.1 only, its unix socket in that directory),
    run as user ``postgres`` when we are root (initdb and postgres refuse root)."""

    kind = "postgres"

    def __init__(self) -> None:
        bindir = postgres_bindir()
        self.what = "a private PostgreSQL cluster"
        if bindir is None or not (bindir / "pg_ctl").exists():
            unavailable(self.what, "no initdb/pg_ctl (/usr/lib/postgresql/*/bin)")
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                unavailable(self.what, "running it as root needs runuser")
            self.as_user = [runuser, "-u", "postgres", "--"]
        self.bindir = bindir
        super().__init__()
        self.data = self.directory / "data"
        self.socket_dir = self.directory / "socket"
        self.socket_dir.mkdir()
        if self.as_user:
            for path in (self.directory, self.socket_dir):
                shutil.chown(path, "postgres", "postgres")
        try:
            _run(
                [
                    *self.as_user,
                    str(bindir / "initdb"),
                    "--pgdata",
                    str(self.data),
                    "--username",
                    "postgres",
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",
                ],
                "initdb",
            )
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.what = f"a private PostgreSQL cluster on 127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        _run(
            [*self.as_user, str(self.bindir / "pg_ctl"), "--pgdata", str(self.data), *args],
            "pg_ctl",
        )

    def _start(self) -> None:
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.socket_dir}",
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c shared_buffers=16MB",
                "-c max_connections=100",
            ]
        )
        self._pg_ctl(
            "start",
            "--wait",
            "--timeout",
            str(int(READY_TIMEOUT)),
            "--log",
            str(self.directory / "server.log"),
            "-o",
            options,
        )

    def _stop(self, mode: str) -> None:
        self._pg_ctl("stop", "--wait", "--mode", mode)

    def _postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def _kill(self) -> None:
        pid = self._postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # its backends exit when they see it gone


# Redis --------------------------------------------------------------------------


class _ChildProcessServer(PrivateServer):
    """A server that runs as our child process (``proc``): SIGTERM stops it
    cleanly (``fast``), SIGKILL at once (``immediate``)."""

    proc: subprocess.Popen[bytes] | None = None

    def _stop(self, mode: str) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM if mode == "fast" else signal.SIGKILL)
        try:
            proc.wait(READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PrivateRedis(_ChildProcessServer):
    """A ``redis-server`` of our own (127.0.0.1, its own directory and log file).
    Without ``persistent`` it keeps nothing on disk (``--save "" --appendonly no``):
    a restart empties it. With it, every write goes to an append-only file
    (written before the reply, fsynced every second), so a restart keeps the data."""

    kind = "redis"

    def __init__(self, persistent: bool = False) -> None:
        self.binary = shutil.which("redis-server")
        self.what = "a private Redis server"
        if self.binary is None:
            unavailable(self.what, "no redis-server")
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None
        super().__init__()
        self.what = f"a private Redis server on 127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _start(self) -> None:
        assert self.binary is not None
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "no",
                "--save",
                "",
                *persistence,
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "server.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(
            lambda: self.proc is not None and (self.proc.poll() is not None or self.pong()),
            f"{self.what} answers PING",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.what} did not start:\n{self.log()}")

    def pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


# SecantusDB (MongoDB wire protocol) -------------------------------------------

SECANTUS_SERVER = """
import signal, sys, threading
from secantus import SecantusDBServer

port, path, lifetime, replica_set = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
server = SecantusDBServer(host="127.0.0.1", port=port, storage_path=path, ttl_sweep_seconds=10**9,
                          transaction_lifetime_seconds=lifetime, replica_set_name=replica_set or None)
stopped = threading.Event()

def reap():  # abort transactions idle past their lifetime, as mongod's periodic reaper does
    while not stopped.wait(0.5):
        server.transactions.prune_expired()

signal.signal(signal.SIGTERM, lambda *_: stopped.set())
server.start()
threading.Thread(target=reap, daemon=True).start()
stopped.wait()
server.stop()
"""


class PrivateSecantus(_ChildProcessServer):
    """A SecantusDB server (see tests/engines/mongodb.py) in a process of its own,
    so that the test may stop and restart it: SIGTERM stops it cleanly, SIGKILL at once.

    A transaction left open by a client that died (a SIGKILLed worker) holds its
    writes' locks until the server aborts it, ``transaction_lifetime`` seconds
    after its last use (mongod's ``transactionLifetimeLimitSeconds``, 60 by
    default); this server checks every 0.5 s, as mongod's reaper does (SecantusDB
    by itself only checks when another transaction runs a statement).

    With ``transactions=False`` it is a standalone server (no replica set), which
    has none: retrybus then takes its code path for a standalone MongoDB."""

    kind = "secantus"

    def __init__(self, transaction_lifetime: float = 60.0, transactions: bool = True) -> None:
        self.transaction_lifetime = transaction_lifetime
        self.replica_set = "secantus" if transactions else ""
        self.what = "a private SecantusDB server"
        try:
            import secantus  # noqa: F401
        except ImportError as exc:
            unavailable(self.what, f"SecantusDB is not installed: {exc}")
        self.proc: subprocess.Popen[bytes] | None = None
        super().__init__()
        self.what = f"a private SecantusDB server on 127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def _start(self) -> None:
        with (self.directory / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SECANTUS_SERVER,
                    str(self.port),
                    str(self.directory / "data"),
                    str(self.transaction_lifetime),
                    self.replica_set,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait(
            lambda: (
                self.proc is not None and (self.proc.poll() is not None or port_answers(self.port))
            ),
            f"{self.what} answers",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.what} did not start:\n{self.log()}")
