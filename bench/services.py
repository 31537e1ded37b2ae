"""Services sharing one store (issue 12) on SQLite, PostgreSQL and Redis.

Figures (ENGINE is sqlite, postgresql or redis):

  fanout_throughput_ENGINE           events/s, one publishing process (a service with no
                                     handlers of its own, 100 concurrent durable
                                     publishes) and three `retrybus worker` processes, one
                                     per service, each service subscribing one handler to
                                     every event: 20,000 events a round, each counted once
                                     its third service has handled it (from the round's
                                     first publish to the last of the three workers' last
                                     handler call returned)
  fanout_floor_ENGINE_round_trip_p50 ms, the store's floor operation (durable.py's: a bare
                                     commit, INSERT or SET) timed every 25 ms by this
                                     process meanwhile
  fanout_cpu_per_event_ENGINE        us, the CPU time (user + system) the publisher and the
                                     three workers spent per event in the measured rounds
                                     (stderr: each process's share); the store server's
                                     own CPU (PostgreSQL, Redis) is not in it
  fanout_cpu_ceiling_ENGINE          events/s, the machine's CPUs divided by that: the rate
                                     at which these four processes would use every CPU of
                                     the machine and nothing else did
  route_publish_latency_ENGINE_1sub_p50
                                     ms, `await bus.publish(event)` from a service with no
                                     handlers of its own, the store keeping one other
                                     service's subscription, which the event matches: the
                                     publish records one delivery for it
  route_publish_latency_ENGINE_50subs_p50
                                     ms, the same with 50 stored subscriptions across 10
                                     services (half exact names, half globs), of which
                                     the event matches that same one: only the routing
                                     differs
  route_publish_overhead_ENGINE_50subs
                                     %, how much slower the 50-subscription p50 is than the
                                     one-subscription p50 (target: under 20)

Sizes: fan-out, three rounds of 20,000 events after one of 1,000, the three
workers and the publisher started once; routing, 1,500 publishes of each kind
after 200 warm-up ones, in blocks of 100 taking turns (the machine's speed
varies from minute to minute). Each engine runs in namespaces of its own,
removed afterwards (durable.py's). A PostgreSQL or Redis server that cannot be
reached is skipped with a note.

Run alone: .venv/bin/python bench/services.py [--engines sqlite,redis]
[--only fanout,routing] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass

from _common import Figure, emit, median, note, percentile, quiet_logging
from durable import ENGINES, PROCESSES, FloorSampler, WorkerProcess, namespace, reachable

from retrybus import Event, EventBus, open_store

PARTS = ("fanout", "routing")
#: the services of the fan-out, each with one worker process
FANOUT_SERVICES = ("billing", "shipping", "crm")
PUBLISHERS = 100
ROUTED_TYPE = "order.placed"


@dataclass(frozen=True)
class Sizes:
    fanout_events: int = 20_000
    fanout_warmup: int = 1_000
    fanout_rounds: int = 3
    route_samples: int = 1_500
    route_warmup: int = 200
    route_block: int = 100


QUICK = Sizes(
    fanout_events=1_000,
    fanout_warmup=200,
    fanout_rounds=1,
    route_samples=200,
    route_warmup=20,
    route_block=20,
)


async def wait_registered(url: str, services: tuple[str, ...]) -> None:
    """Until each service's subscription is stored (its worker registers on start)."""
    bus = EventBus(open_store(url))
    try:
        deadline = time.monotonic() + 60
        while {s.service for s in await bus.services.list()} < set(services):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers of {services} did not register")
            await asyncio.sleep(0.05)
    finally:
        await bus.close()


# fan-out -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) process ``pid`` has used so far (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fanout_throughput(engine: str, url: str, sizes: Sizes) -> list[Figure]:
    counts = [sizes.fanout_warmup] + [sizes.fanout_events] * sizes.fanout_rounds
    marks = ",".join(str(sum(counts[: n + 1])) for n in range(len(counts)))
    workers = [
        await WorkerProcess.start(
            url, env={"RETRYBUS_BENCH_MARKS": marks, "RETRYBUS_BENCH_SERVICE": service}
        )
        for service in FANOUT_SERVICES
    ]
    publisher: asyncio.subprocess.Process | None = None
    sampler = FloorSampler(engine)
    rates: list[float] = []
    details: list[str] = []
    cpu: list[float] = []  # per process: seconds over the measured rounds
    try:
        await wait_registered(url, FANOUT_SERVICES)
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROCESSES),
            "publish",
            "--store",
            url,
            "--service",
            "shop",
            "--warmup",
            str(sizes.fanout_warmup),
            "--count",
            str(sizes.fanout_events),
            "--rounds",
            str(sizes.fanout_rounds),
            "--concurrency",
            str(PUBLISHERS),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert publisher.stdin is not None
        assert publisher.stdout is not None
        await sampler.__aenter__()
        if (await asyncio.wait_for(publisher.stdout.readline(), 60)).strip() != b"ready":
            raise RuntimeError("the publishing process did not start")
        pids = [worker.process.pid for worker in workers]
        for index, count in enumerate(counts):
            publisher.stdin.write(b"go\n")
            await publisher.stdin.drain()
            sent = json.loads(await asyncio.wait_for(publisher.stdout.readline(), 300))
            lasts = [float((await worker.mark("done"))[2]) for worker in workers]
            if index == 0:  # the warm-up round: count from here
                cpu = [-sent["cpu"]] + [-cpu_seconds(pid) for pid in pids]
            if index:
                rates.append(count / (max(lasts) - sent["start"]))
                details.append(
                    f"published in {sent['end'] - sent['start']:.2f}s, the services done "
                    + ", ".join(f"{last - sent['end']:.2f}s" for last in lasts)
                    + " after the last publish"
                )
        cpu = [cpu[0] + sent["cpu"]] + [
            spent + cpu_seconds(pid) for spent, pid in zip(cpu[1:], pids, strict=True)
        ]
        publisher.stdin.close()
        await asyncio.wait_for(publisher.wait(), 30)
    finally:
        if publisher is not None and publisher.returncode is None:
            publisher.kill()
            await publisher.wait()
        for worker in workers:
            await worker.stop()
        await sampler.__aexit__(None, None, None)
    measured = sum(counts[1:])
    per_event = sum(cpu) / measured * 1e6
    note(f"fan-out {engine}: {[round(r) for r in rates]} events/s; " + "; ".join(details))
    note(
        f"fan-out {engine}: CPU per event {per_event:.0f} us: publisher "
        f"{cpu[0] / measured * 1e6:.0f} us, "
        + ", ".join(
            f"{service} {spent / measured * 1e6:.0f} us"
            for service, spent in zip(FANOUT_SERVICES, cpu[1:], strict=True)
        )
        + f"; {os.cpu_count()} CPUs"
    )
    return [
        sampler.figure(f"fanout_floor_{engine}_round_trip_p50"),
        Figure(f"fanout_throughput_{engine}", median(rates), "events/s"),
        Figure(f"fanout_cpu_per_event_{engine}", per_event, "us"),
        Figure(f"fanout_cpu_ceiling_{engine}", (os.cpu_count() or 1) / per_event * 1e6, "events/s"),
    ]


# the cost of routing ------------------------------------------------------------


async def store_subscriptions(url: str, services: int, per_service: int) -> None:
    """``services`` × ``per_service`` stored subscriptions, of which only the
    first service's first handler matches ``ROUTED_TYPE``."""
    store = open_store(url)
    try:
        for s in range(services):
            bus = EventBus(store, service=f"svc{s}")
            for h in range(per_service):
                if s == 0 and h == 0:
                    pattern = ROUTED_TYPE
                elif h % 2:
                    pattern = f"other{s}_{h}.*"
                else:
                    pattern = f"other{s}.h{h}"
                bus.subscribe(pattern, _succeed, name=f"Handler{h}")
            await bus.register()
    finally:
        await store.close()


async def _succeed(event: Event) -> None:
    return None


async def route_publish_latency(
    engine: str, one_url: str, fifty_url: str, sizes: Sizes
) -> list[Figure]:
    await store_subscriptions(one_url, 1, 1)
    await store_subscriptions(fifty_url, 10, 5)
    shops = [EventBus(open_store(url), service="shop") for url in (one_url, fifty_url)]
    samples: list[list[float]] = [[], []]
    clock = time.perf_counter_ns
    try:
        for shop in shops:
            await shop.store.connect()
            for n in range(sizes.route_warmup):
                await shop.publish(Event(ROUTED_TYPE, {"n": n}, source="bench"))
        for block in range(0, sizes.route_samples, sizes.route_block):
            for shop, taken in zip(shops, samples, strict=True):
                for n in range(block, block + sizes.route_block):
                    event = Event(ROUTED_TYPE, {"n": n}, source="bench")
                    start = clock()
                    result = await shop.publish(event)
                    taken.append((clock() - start) / 1e6)
                    if len(result.routed) != 1:
                        raise RuntimeError(f"routed {result.routed}, expected one delivery")
    finally:
        for shop in shops:
            await shop.close()
    one, fifty = (percentile(taken, 0.5) for taken in samples)
    note(
        f"routing {engine}: p50 {one:.3f} ms with 1 subscription, {fifty:.3f} ms with 50; "
        f"p90 {percentile(samples[0], 0.9):.3f} / {percentile(samples[1], 0.9):.3f} ms"
    )
    return [
        Figure(f"route_publish_latency_{engine}_1sub_p50", one, "ms"),
        Figure(f"route_publish_latency_{engine}_50subs_p50", fifty, "ms"),
        Figure(f"route_publish_overhead_{engine}_50subs", (fifty / one - 1) * 100, "%"),
    ]


# running ----------------------------------------------------------------------


async def measure(
    engines: tuple[str, ...] = ENGINES, parts: tuple[str, ...] = PARTS, sizes: Sizes = Sizes()
) -> list[Figure]:
    quiet_logging()
    figures: list[Figure] = []
    for engine in engines:
        if not await reachable(engine):
            continue
        started = time.perf_counter()
        if "fanout" in parts:
            async with namespace(engine) as url:
                figures += await fanout_throughput(engine, url, sizes)
        if "routing" in parts:
            async with namespace(engine) as one_url, namespace(engine) as fifty_url:
                figures += await route_publish_latency(engine, one_url, fifty_url, sizes)
        note(f"services {engine}: {time.perf_counter() - started:.1f}s")
    return figures


def run() -> list[Figure]:
    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to try it out")
    args = parser.parse_args()
    engines = tuple(e for e in args.engines.split(",") if e)
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = (set(engines) - set(ENGINES)) | (set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown engine or part: {', '.join(sorted(unknown))}")
    emit(asyncio.run(measure(engines, parts, QUICK if args.quick else Sizes())))


if __name__ == "__main__":
    main()
