"""retrybus beside Dramatiq, Celery and FastStream on the same local brokers
(`make bench-peers`; what each system runs and why: bench/peers/README.md).

Per broker (Redis 6379, RabbitMQ 5672 guest/guest, NATS 4222 with JetStream)
and per system, in fresh namespaces removed afterwards (even on failure):

  1. publish p50/p99   2,000 sequential awaited publishes, no consumer running
  2. throughput        EVENTS published beforehand; one consumer process
                       (concurrency 16, a no-op handler) from its READY to the
                       EVENTS-th handler call
  3. failonce          the same, each event's first call raising, its retry succeeding
  4. latency p50       consumer running, 2,000 events one every 2 ms, publish to handler
  5. rss               the phase-2 consumer's peak RSS (VmHWM) once done

stdout: ``peers_<broker>_<system>_<figure> VALUE UNIT`` and
``floor_<broker>_<figure> VALUE UNIT``, then ``..._ratio VALUE x`` (peer ÷ retrybus).
stderr: progress, package and server versions, what was skipped and why.

  .venv/bin/python bench/peers/run.py [--only retrybus,dramatiq,celery,faststream]
      [--broker redis|rabbitmq|nats[,…]] [--events N] [--no-floors]

Never flushes or restarts a broker: Redis keys are deleted by the run's prefix,
the RabbitMQ vhost (``rabbitmqctl add_vhost``) deleted, NATS streams deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEMS_DIR = HERE / "systems"
sys.path.insert(0, str(HERE.parent))  # bench/_common.py
sys.path.insert(0, str(HERE))

from _common import Figure, note, percentile  # noqa: E402  (bench/_common.py)
from floors import FLOORS  # noqa: E402

REDIS = "redis://127.0.0.1:6379/0"
AMQP_BASE = "amqp://guest:guest@127.0.0.1:5672"
NATS = "nats://127.0.0.1:4222"
BROKERS = ("redis", "rabbitmq", "nats")
SYSTEMS = ("retrybus", "dramatiq", "celery", "faststream")
SUPPORTED = {
    "retrybus": {"redis", "rabbitmq", "nats"},
    "dramatiq": {"redis", "rabbitmq"},
    "celery": {"redis", "rabbitmq"},
    "faststream": {"redis", "rabbitmq", "nats"},
}
PACKAGES = (
    "retrybus",
    "dramatiq",
    "celery",
    "kombu",
    "faststream",
    "redis",
    "aio-pika",
    "aiormq",
    "pika",
    "amqp",
    "nats-py",
    "psutil",
)
PUBLISHES = 2_000
PACED = 2_000
READY_TIMEOUT = 60.0
STALL_TIMEOUT = 30.0  # no handler call for this long: the phase failed
PY = sys.executable
BIN = Path(sys.executable).parent

FIGURE_UNITS = {
    "publish_p50": "ms",
    "publish_p99": "ms",
    "throughput": "events/s",
    "failonce_throughput": "events/s",
    "latency_p50": "ms",
    "rss": "MB",
}


class PhaseFailed(Exception):
    pass


# namespaces -------------------------------------------------------------------


class Run:
    """One run's namespaces on the brokers, and their removal."""

    def __init__(self) -> None:
        self.tag = f"rbpeers-{uuid.uuid4().hex[:8]}"
        self.vhost: str | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))

    def amqp_url(self) -> str:
        assert self.vhost is not None
        return f"{AMQP_BASE}/{self.vhost}"

    def env(self, broker: str, ns: str, kind: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PEERS_BROKER=broker,
            PEERS_NS=ns,
            PEERS_KIND=kind,
            PEERS_REDIS=REDIS,
            PEERS_NATS=NATS,
            PEERS_STORE=f"sqlite:///{self.tmp / (ns + '.db')}",
            PYTHONUNBUFFERED="1",
        )
        if self.vhost is not None:
            env["PEERS_AMQP"] = self.amqp_url()
        env.update(extra)
        return env

    def open_vhost(self) -> None:
        self.vhost = self.tag
        _rabbitmqctl("add_vhost", self.vhost)
        _rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    def close_vhost(self) -> None:
        if self.vhost is not None:
            with contextlib.suppress(Exception):
                _rabbitmqctl("delete_vhost", self.vhost)
            self.vhost = None

    def clean(self, broker: str, prefix: str | None = None) -> None:
        """Remove what the run (or the names starting ``prefix``) left on ``broker``."""
        prefix = prefix or self.tag
        try:
            if broker == "redis":
                asyncio.run(_redis_delete(prefix))
            elif broker == "nats":
                asyncio.run(_nats_delete(prefix))
            elif broker == "rabbitmq" and prefix == self.tag:
                self.close_vhost()
        except Exception as exc:  # cleaning up: say so and go on
            note(f"  cleanup of {prefix} on {broker} failed: {exc!r}")


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout}")
    return done.stdout


async def _redis_delete(prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS)
    try:
        batch = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await client.delete(*batch)
                batch = []
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


async def _nats_delete(prefix: str) -> None:
    import nats

    client = await nats.connect(NATS)
    try:
        js = client.jetstream()
        wanted = prefix.upper().replace("-", "_")
        for info in await js.streams_info():
            if info.config.name.startswith(wanted):
                await js.delete_stream(info.config.name)
    finally:
        await client.close()


# versions ---------------------------------------------------------------------


def package_versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def server_version(broker: str) -> str:
    try:
        if broker == "redis":

            async def redis_version() -> str:
                from redis.asyncio import Redis

                client = Redis.from_url(REDIS)
                try:
                    info = await client.info("server")
                    return f"Redis {info['redis_version']}"
                finally:
                    await client.aclose()

            return asyncio.run(redis_version())
        if broker == "rabbitmq":
            for line in _rabbitmqctl("status").splitlines():
                if "RabbitMQ version" in line or line.strip().startswith("RabbitMQ "):
                    return line.strip()
            return "RabbitMQ " + _rabbitmqctl("version").strip()
        if broker == "nats":

            async def nats_version() -> str:
                import nats

                client = await nats.connect(NATS)
                try:
                    return f"NATS {client.connected_server_version}"
                finally:
                    await client.close()

            return asyncio.run(nats_version())
    except Exception as exc:  # only reported
        return f"{broker} version unknown ({exc!r})"
    return broker


# processes --------------------------------------------------------------------


def system_script(system: str) -> str:
    return str(SYSTEMS_DIR / f"{system}_app.py")


def consumer_command(system: str, ns: str) -> list[str]:
    if system == "retrybus":
        return [PY, system_script("retrybus"), "consume"]
    if system == "dramatiq":
        return [
            str(BIN / "dramatiq"),
            "dramatiq_app",
            "--path",
            str(SYSTEMS_DIR),
            "--processes",
            "1",
            "--threads",
            "16",
        ]
    if system == "celery":
        return [
            str(BIN / "celery"),
            "-A",
            "celery_app",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            "16",
            "-Q",
            ns,
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
        ]
    if system == "faststream":
        return [str(BIN / "faststream"), "run", "faststream_app:app"]
    raise ValueError(system)


def publisher(run: Run, system: str, broker: str, ns: str, kind: str, mode: str, count: int) -> Any:
    """Run the system's publisher to its end; its JSON result."""
    log = run.tmp / f"{ns}-{mode}.log"
    with open(log, "w") as err:
        done = subprocess.run(
            [PY, system_script(system), mode, str(count)],
            cwd=SYSTEMS_DIR,
            env=run.env(broker, ns, kind),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=600,
            check=False,
        )
    if done.returncode != 0:
        raise PhaseFailed(f"{system} publisher ({mode}) exited {done.returncode}: {_tail(log)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Consumer:
    """A system's consumer process, in a session of its own, and its probe file."""

    def __init__(self, run: Run, system: str, broker: str, ns: str, kind: str, target: int):
        self.probe = run.tmp / f"{ns}.probe"
        self.log = run.tmp / f"{ns}-consumer.log"
        self.system = system
        self.probe.unlink(missing_ok=True)  # never read a file an earlier consumer left
        self._out = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            consumer_command(system, ns),
            cwd=SYSTEMS_DIR,
            env=run.env(
                broker,
                ns,
                kind,
                PEERS_PROBE=str(self.probe),
                PEERS_TARGET=str(target),
            ),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.probe.read_text())
        except (OSError, ValueError):
            return None

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise PhaseFailed(
                f"{self.system} consumer exited {self.process.returncode}: {_tail(self.log)}"
            )

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            state = self.state()
            if state and state.get("ready"):
                return state
            self._check_alive()
            if time.monotonic() > deadline:
                raise PhaseFailed(f"{self.system} consumer not READY within {READY_TIMEOUT:.0f} s")
            time.sleep(0.02)

    def wait_done(self, target: int) -> dict[str, Any]:
        last_progress, last_change = (-1, -1), time.monotonic()
        while True:
            state = self.state() or {}
            if state.get("done"):
                return state
            hits = state.get("hits", 0)
            progress = (hits, state.get("calls", 0))  # failed calls are progress too
            now = time.monotonic()
            if progress != last_progress:
                last_progress, last_change = progress, now
            elif now - last_change > STALL_TIMEOUT:
                raise PhaseFailed(
                    f"{self.system} consumer stalled at {hits} of {target} successful calls, "
                    f"{progress[1]} calls in all, none for {STALL_TIMEOUT:.0f} s "
                    f"({_tail(self.log, 3)})"
                )
            self._check_alive()
            time.sleep(0.05)

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=15)
        finally:
            self._out.close()


@contextlib.contextmanager
def consumer(
    run: Run, system: str, broker: str, ns: str, kind: str, target: int
) -> Iterator[Consumer]:
    started = Consumer(run, system, broker, ns, kind, target)
    try:
        yield started
    finally:
        started.stop()


# phases -----------------------------------------------------------------------


class Results:
    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str], float] = {}

    def add(self, broker: str, system: str, figure: str, value: float) -> None:
        self.values[(broker, system, figure)] = value
        unit = FIGURE_UNITS.get(figure, "ms")
        print(Figure(f"peers_{broker}_{system}_{figure}", value, unit).line(), flush=True)

    def not_applicable(self, broker: str, system: str, figure: str, why: str) -> None:
        print(f"peers_{broker}_{system}_{figure} n/a {FIGURE_UNITS[figure]}", flush=True)
        note(f"  peers_{broker}_{system}_{figure}: n/a: {why}")

    def ratios(self) -> None:
        brokers = {broker for broker, _, _ in self.values}
        for broker in sorted(brokers):
            if not any(
                b == broker and s == "retrybus" for b, s, f in self.values if f != "retry_add_p50"
            ):
                note(f"{broker}: no ratios: retrybus has no figures on it in this run")
        for (broker, system, figure), value in self.values.items():
            if system == "retrybus" or figure not in FIGURE_UNITS:
                continue
            mine = self.values.get((broker, "retrybus", figure))
            if mine:
                print(
                    Figure(f"peers_{broker}_{system}_{figure}_ratio", value / mine, "x").line(),
                    flush=True,
                )


def ms(ns: float) -> float:
    return ns / 1e6


def measure_system(run: Run, results: Results, broker: str, system: str, events: int) -> None:
    base = f"{run.tag}-{broker[:4]}-{system[:4]}"
    publishes = min(PUBLISHES, events)
    paced = min(PACED, events)

    def clean(ns: str) -> None:
        if broker != "rabbitmq":
            run.clean(broker, ns)

    def phase(name: str, work: Any) -> None:
        started = time.monotonic()
        try:
            work()
        except PhaseFailed as exc:
            note(f"  {broker}/{system} {name}: FAILED: {exc}")
        except Exception as exc:  # one phase failing leaves the others
            note(f"  {broker}/{system} {name}: FAILED: {exc!r}")
        else:
            note(f"  {broker}/{system} {name}: {time.monotonic() - started:.1f} s")

    # 1. publish latency
    def publish_phase() -> None:
        ns = f"{base}-pub"
        try:
            out = publisher(run, system, broker, ns, "plain", "timed", publishes)
            samples = out["samples_ns"]
            results.add(broker, system, "publish_p50", ms(percentile(samples, 0.50)))
            results.add(broker, system, "publish_p99", ms(percentile(samples, 0.99)))
            if broker == "redis" and system == "dramatiq":
                results.add(broker, system, "enqueue_p50", ms(percentile(samples, 0.50)))
        finally:
            clean(ns)

    # 2 and 5. throughput, rss; 3. fail-once throughput
    def drain_phase(kind: str) -> None:
        figure = "throughput" if kind == "plain" else "failonce_throughput"
        ns = f"{base}-{kind}"
        try:
            out = publisher(run, system, broker, ns, kind, "bulk", events)
            note(f"  {broker}/{system} {kind}: {events} published in {out['seconds']:.1f} s")
            with consumer(run, system, broker, ns, kind, events) as running:
                running.wait_ready()
                state = running.wait_done(events)
            seconds = (state["done"] - state["ready"]) / 1e9
            results.add(broker, system, figure, events / seconds)
            if kind == "plain":
                results.add(broker, system, "rss", state["hwm_kb"] / 1024)
        finally:
            clean(ns)

    # 4. publish-to-handler latency
    def latency_phase() -> None:
        ns = f"{base}-lat"
        try:
            with consumer(run, system, broker, ns, "latency", paced) as running:
                running.wait_ready()
                publisher(run, system, broker, ns, "latency", "paced", paced)
                state = running.wait_done(paced)
            results.add(broker, system, "latency_p50", ms(percentile(state["latencies_ns"], 0.5)))
        finally:
            clean(ns)

    phase("publish", publish_phase)
    phase("throughput", lambda: drain_phase("plain"))
    if system == "faststream" and broker == "redis":
        results.not_applicable(
            broker,
            system,
            "failonce_throughput",
            "FastStream's Redis Streams subscriber redelivers nothing without a claimer "
            "(a nacked message stays pending in the group until XCLAIM/XAUTOCLAIM)",
        )
    else:
        phase("failonce", lambda: drain_phase("failonce"))
    phase("latency", latency_phase)
    if broker == "redis" and system == "retrybus":

        def retry_add_phase() -> None:
            ns = f"{base}-radd"
            try:
                out = publisher(run, system, broker, ns, "plain", "retryadd", PUBLISHES)
                results.add(broker, system, "retry_add_p50", ms(percentile(out["samples_ns"], 0.5)))
            finally:
                clean(ns)

        phase("retry_add", retry_add_phase)


def retrybus_missing(broker: str) -> str | None:
    """Why retrybus cannot run on ``broker`` in this checkout (None: it can); the
    same check as systems/retrybus_app.py makes (whose imports clash with ours)."""
    import importlib.util

    module = f"retrybus._transports.{broker}"
    if importlib.util.find_spec(module) is None:
        return f"transport not available in this checkout ({module} is missing)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SYSTEMS), help="systems, comma-separated")
    parser.add_argument("--broker", default=",".join(BROKERS), help="brokers, comma-separated")
    parser.add_argument("--events", type=int, default=20_000, help="events per throughput phase")
    parser.add_argument("--no-floors", action="store_true", help="skip the raw clients' floors")
    args = parser.parse_args(argv)
    systems = [s for s in args.only.split(",") if s]
    brokers = [b for b in args.broker.split(",") if b]
    for name in systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name!r}: {', '.join(SYSTEMS)}")
    for name in brokers:
        if name not in BROKERS:
            parser.error(f"unknown broker {name!r}: {', '.join(BROKERS)}")

    started = time.monotonic()
    note(f"python {sys.version.split()[0]}; {package_versions()}")
    results = Results()
    run = Run()
    note(f"run {run.tag}: {args.events} events per throughput phase; files in {run.tmp}")
    try:
        for broker in brokers:
            note(f"{broker}: {server_version(broker)}")
            try:
                if broker == "rabbitmq":
                    run.open_vhost()
                    note(f"  vhost {run.vhost}")
                if not args.no_floors:
                    try:
                        url = (
                            run.amqp_url()
                            if broker == "rabbitmq"
                            else (REDIS if broker == "redis" else NATS)
                        )
                        floor = asyncio.run(
                            FLOORS[broker](url, f"{run.tag}-floor", PUBLISHES, args.events)
                        )
                        print(
                            Figure(f"floor_{broker}_publish_p50", floor["publish_p50"], "ms").line()
                        )
                        print(
                            Figure(
                                f"floor_{broker}_consume_throughput",
                                floor["consume_throughput"],
                                "events/s",
                            ).line(),
                            flush=True,
                        )
                    except Exception as exc:
                        note(f"  floor on {broker}: FAILED: {exc!r}")
                for system in systems:
                    if broker not in SUPPORTED[system]:
                        note(f"  {broker}/{system}: skipped ({system} has no {broker} broker)")
                        continue
                    if system == "retrybus":
                        missing = retrybus_missing(broker)
                        if missing:
                            note(f"  {broker}/retrybus: skipped: {missing}")
                            print(f"# peers_{broker}_retrybus: {missing}", flush=True)
                            if broker == "redis":
                                # the store's retry add needs no transport
                                measure_retry_add(run, results)
                            continue
                    note(f"  {broker}/{system}: …")
                    measure_system(run, results, broker, system, args.events)
            finally:
                run.clean(broker)
    finally:
        run.close_vhost()
        with contextlib.suppress(OSError):
            for path in run.tmp.iterdir():
                path.unlink()
            run.tmp.rmdir()
    results.ratios()
    note(f"done in {time.monotonic() - started:.0f} s")
    return 0


def measure_retry_add(run: Run, results: Results) -> None:
    ns = f"{run.tag}-redi-retr-radd"
    try:
        out = publisher(run, "retrybus", "redis", ns, "plain", "retryadd", PUBLISHES)
        results.add("redis", "retrybus", "retry_add_p50", ms(percentile(out["samples_ns"], 0.5)))
    except Exception as exc:
        note(f"  redis/retrybus retry_add: FAILED: {exc!r}")
    finally:
        run.clean("redis", ns)


if __name__ == "__main__":
    sys.exit(main())
