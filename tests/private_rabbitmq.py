"""A private RabbitMQ node for the tests that stop and restart their broker.

The machine's RabbitMQ (``rabbit@localhost``, 127.0.0.1:5672) is shared and is
never stopped. ``PrivateRabbit`` runs the machine's ``rabbitmq-server`` once
more as a node of its own: user ``rabbitmq`` (its Erlang cookie, so that
``rabbitmqctl`` reaches the node), node name ``rbt<port>@localhost``, its own
AMQP and distribution ports, its data and logs in a temporary directory, a
config file with its listener only and an empty enabled-plugins file (no
management listener to clash with the shared node's). It starts in 2-5 s and
takes ~120 MB.

``stop("fast")`` is ``rabbitmqctl -n NODE stop PIDFILE`` (which waits until the
process is gone); ``stop("immediate")`` is SIGKILL of its ``beam.smp``; ``start``
boots it again on the same data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from engines._common import unavailable
from private_servers import READY_TIMEOUT, PrivateServer, _run, free_port

RABBITMQ_USER = "rabbitmq"


class PrivateRabbit(PrivateServer):
    """A RabbitMQ node of the test's own (guest/guest on 127.0.0.1:``port``)."""

    kind = "rabbitmq"

    def __init__(self) -> None:
        self.what = "a private RabbitMQ node"
        server = shutil.which("rabbitmq-server") or _sbin("rabbitmq-server")
        ctl = shutil.which("rabbitmqctl") or _sbin("rabbitmqctl")
        if server is None or ctl is None:
            unavailable(self.what, "no rabbitmq-server/rabbitmqctl on this machine")
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                unavailable(self.what, "running it as root needs runuser")
            self.as_user = [runuser, "-u", RABBITMQ_USER, "--"]
        self.server, self.ctl = server, ctl
        super().__init__()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.node = f"rbt{self.port}@localhost"
        self.what = f"a private RabbitMQ node {self.node} on 127.0.0.1:{self.port}"
        self._write_files()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F?exchange=retrybus"

    def _write_files(self) -> None:
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        # the machine's rabbitmq-env.conf names the shared node: read none
        (self.directory / "rabbitmq-env.conf").write_text("")
        if self.as_user:
            shutil.chown(self.directory, RABBITMQ_USER, RABBITMQ_USER)
            for path in self.directory.iterdir():
                shutil.chown(path, RABBITMQ_USER, RABBITMQ_USER)

    def _env(self) -> list[str]:
        d = self.directory
        return [
            "env",
            f"RABBITMQ_CONF_ENV_FILE={d / 'rabbitmq-env.conf'}",
            f"RABBITMQ_NODENAME={self.node}",
            "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
            f"RABBITMQ_NODE_PORT={self.port}",
            f"RABBITMQ_DIST_PORT={self.dist_port}",
            f"RABBITMQ_MNESIA_BASE={d / 'mnesia'}",
            f"RABBITMQ_LOG_BASE={d / 'log'}",
            f"RABBITMQ_CONFIG_FILE={d / 'rabbitmq.conf'}",
            f"RABBITMQ_ENABLED_PLUGINS_FILE={d / 'enabled_plugins'}",
            f"RABBITMQ_PID_FILE={self.pid_file}",
            "ERL_EPMD_ADDRESS=127.0.0.1",
        ]

    @property
    def pid_file(self) -> Path:
        return self.directory / "rabbitmq.pid"

    def _start(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        _run([*self.as_user, *self._env(), self.server, "-detached"], "rabbitmq-server")

    def _stop(self, mode: str) -> None:
        pid = self._pid()
        if mode == "fast":
            _run(
                [
                    *self.as_user,
                    *self._env(),
                    self.ctl,
                    "-n",
                    self.node,
                    "stop",
                    str(self.pid_file),
                ],
                "rabbitmqctl stop",
                timeout=READY_TIMEOUT * 2,
            )
        elif pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if pid is not None:
            _wait_gone(pid)

    def _pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text().strip())
        return None

    def _kill(self) -> None:
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)

    def log(self) -> str:
        path = self.directory / "log" / f"{self.node}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _sbin(name: str) -> str | None:
    path = Path("/usr/sbin") / name
    return str(path) if path.exists() else None


def _wait_gone(pid: int, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # a beam we killed is a zombie until runuser's child reaps it; /proc tells
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return
        time.sleep(0.05)
