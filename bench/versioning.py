"""What event versioning costs: the stamp on publish, one upcast step, a pydantic
validation, and a worker draining items that need upcasting.

Workloads (one process, the variants taking turns in rounds, so that a busy
spell of the machine hits them alike; the order within a round rotates):
  publish  ``await bus.publish(event)`` of prebuilt events, one async handler
           that returns at once, on the memory store inline (``durable=False``)
           and on a SQLite file (durable: a pending record, the inline call, its
           removal), in blocks of publishes of each variant: ``unregistered``
           (a type the bus does not know; another one is registered, so the
           stamp's lookup runs), ``registered`` (version 3, a pydantic model,
           ``validate=None``: the stamp alone), and ``validated`` (the same with
           ``validate="publish"``)
  read     ``EventTypes.read`` of a v2 event of a type at v3 (one upcaster:
           a field added with a default), and of a v3 event (nothing to do)
  model    ``EventTypes.model``: a five-field pydantic model validated from the
           event's data (and pydantic's ``model_validate`` alone, on stderr)
  worker   ``RetryWorker.run_once`` in a loop (library defaults: batch 100,
           concurrency 16) draining due pending deliveries (the records
           ``publish(defer=True)`` writes) of current-version events, or of v1
           events that need both upcasters, same handler; a fresh SQLite file
           (and memory store) each round

Figures:
  versioning_publish_unregistered_<store>    µs per publish, an unregistered type
  versioning_publish_registered_<store>      µs per publish, a registered type,
                                             validate=None (no upcast to do)
  versioning_publish_overhead_<store>        % slower, registered than unregistered
                                             (median of each round's ratio)
  versioning_publish_validated_<store>       µs per publish, validate="publish"
  versioning_publish_validation_cost_<store> µs added per publish by the validation
                                             (median of each round's difference)
  versioning_read_current                    µs per read with nothing to do
  versioning_upcast_step                     µs per read with one step, minus the
                                             read with nothing to do
  versioning_model_validate                  µs per EventTypes.model
  versioning_floor_event_build               µs to build one event with a stamp (an
                                             event is immutable: the least a stamp costs)
  versioning_floor_share_memory              % of an unregistered inline publish on
                                             the memory store that floor is (the
                                             overhead target cannot be below it)
  versioning_worker_current_<store>          items/s, current-version items
  versioning_worker_upcast_<store>           items/s, v1 items (two upcasts each)
  versioning_worker_slowdown_<store>         % lower, the v1 figure than the current one

<store>: ``memory`` and ``sqlite``.

Run alone: .venv/bin/python bench/versioning.py [--only publish,read,worker] [--quick]
[--profile DIR]
(--quick: tiny sizes, to try it out; --profile: cProfile a registered publish
loop, the read loops and a v1 worker drain into DIR/<what>.prof).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _common import Figure, emit, median, note, quiet_logging
from pydantic import BaseModel

from retrybus import Event, EventBus, RetryWorker, open_store
from retrybus._event import stamped  # the floor: one event built with its stamp
from retrybus._event_types import EventTypes  # the registry a bus keeps, alone
from retrybus._records import RetryItem  # seeding builds the rows as publish(defer=True) does

HANDLER = "bench.handle"
UNREGISTERED = "bench.plain"
REGISTERED = "bench.liked"
VALIDATED = "bench.checked"
VERSION = 3
PARTS = ("publish", "read", "worker")
PUBLISH_KINDS = ("unregistered", "registered", "validated")
TYPE_OF = {"unregistered": UNREGISTERED, "registered": REGISTERED, "validated": VALIDATED}


@dataclass(frozen=True)
class Sizes:
    memory_block: int = 2_000
    sqlite_block: int = 250
    memory_rounds: int = 15
    sqlite_rounds: int = 24
    reads: int = 20_000
    read_rounds: int = 15
    worker_items: int = 2_000
    worker_rounds: int = 11


QUICK = Sizes(
    memory_block=200,
    sqlite_block=20,
    memory_rounds=3,
    sqlite_rounds=3,
    reads=2_000,
    read_rounds=3,
    worker_items=200,
    worker_rounds=2,
)


class Liked(BaseModel):
    """The five-field model of the current version (v3)."""

    post_id: int
    user_id: int
    reaction: str
    weight: float
    public: bool


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v1 called the post ``post``."""
    lifted = {key: value for key, value in data.items() if key != "post"}
    lifted["post_id"] = data["post"]
    return lifted


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """v3 added ``public``, true unless said otherwise."""
    return {**data, "public": data.get("public", True)}


UPCASTERS = {1: _v1_to_v2, 2: _v2_to_v3}


def current_data(n: int) -> dict[str, Any]:
    return {"post_id": n, "user_id": n % 97, "reaction": "like", "weight": 1.0, "public": True}


def v2_data(n: int) -> dict[str, Any]:
    return {"post_id": n, "user_id": n % 97, "reaction": "like", "weight": 1.0}


def v1_data(n: int) -> dict[str, Any]:
    return {"post": n, "user_id": n % 97, "reaction": "like", "weight": 1.0}


def register(types: Callable[..., Any]) -> None:
    """The bench's types, through ``bus.event_type`` or ``EventTypes.register``."""
    types(REGISTERED, version=VERSION, schema=Liked, upcasters=UPCASTERS, validate=None)
    types(VALIDATED, version=VERSION, schema=Liked, upcasters=UPCASTERS, validate="publish")


async def _handle(event: Event) -> None:
    return None


def _bus(url: str) -> EventBus:
    bus = EventBus(open_store(url))
    register(bus.event_type)
    bus.subscribe("bench.*", _handle, name=HANDLER)
    return bus


# publish ---------------------------------------------------------------------


def _events(kind: str, count: int) -> list[Event]:
    return [Event(TYPE_OF[kind], current_data(n), source="bench") for n in range(count)]


async def _publish_block(bus: EventBus, events: list[Event], durable: bool) -> float:
    """µs per publish of ``events``."""
    publish = bus.publish
    gc.collect()
    start = time.perf_counter_ns()
    for event in events:
        await publish(event, durable=durable)
    return (time.perf_counter_ns() - start) / 1e3 / len(events)


async def measure_publish(store: str, url: str, sizes: Sizes) -> list[Figure]:
    durable = store != "memory"
    block = sizes.sqlite_block if durable else sizes.memory_block
    rounds = sizes.sqlite_rounds if durable else sizes.memory_rounds
    bus = _bus(url)
    times: dict[str, list[float]] = {kind: [] for kind in PUBLISH_KINDS}
    try:
        for kind in PUBLISH_KINDS:  # warm-up
            await _publish_block(bus, _events(kind, block), durable)
        for round_ in range(rounds):
            blocks = {kind: _events(kind, block) for kind in PUBLISH_KINDS}
            turn = round_ % len(PUBLISH_KINDS)  # each kind first, second and last alike
            for kind in PUBLISH_KINDS[turn:] + PUBLISH_KINDS[:turn]:
                times[kind].append(await _publish_block(bus, blocks[kind], durable))
    finally:
        await bus.close()
    plain, stamped, checked = (times[kind] for kind in PUBLISH_KINDS)
    ratios = [s / p for s, p in zip(stamped, plain, strict=True)]
    added = [c - s for c, s in zip(checked, stamped, strict=True)]
    note(
        f"publish {store}: {rounds} rounds x {block} publishes of each; µs per "
        f"publish unregistered {_rounded(plain)}, registered {_rounded(stamped)}, "
        f"validated {_rounded(checked)} (medians reported)"
    )
    return [
        Figure(f"versioning_publish_unregistered_{store}", median(plain), "µs"),
        Figure(f"versioning_publish_registered_{store}", median(stamped), "µs"),
        Figure(f"versioning_publish_overhead_{store}", (median(ratios) - 1) * 100, "%"),
        Figure(f"versioning_publish_validated_{store}", median(checked), "µs"),
        Figure(f"versioning_publish_validation_cost_{store}", median(added), "µs"),
    ]


def _rounded(values: list[float]) -> list[float]:
    return [round(value, 2) for value in values]


# read and model ----------------------------------------------------------------


def _loop(call: Callable[[Event], Any], event: Event, count: int) -> float:
    """µs per ``call(event)``."""
    start = time.perf_counter_ns()
    for _ in range(count):
        call(event)
    return (time.perf_counter_ns() - start) / 1e3 / count


def measure_reads(sizes: Sizes) -> list[Figure]:
    types = EventTypes()
    register(types.register)
    # the upcasters return new dicts, so one event serves every read
    v2 = Event(REGISTERED, v2_data(7), source="bench", extensions={"dataversion": "2"})
    v3 = Event(REGISTERED, current_data(7), source="bench", extensions={"dataversion": "3"})
    if types.read(v2).data != v3.data or types.read(v3) is not v3:
        raise RuntimeError("the bench's upcast does not give the current data")
    read, model, validate = types.read, types.model, Liked.model_validate
    # an immutable event cannot take a stamp in place: the least a stamp costs is
    # building one event (its eight fields) with the type's read-only extensions
    unstamped = Event(REGISTERED, current_data(7), source="bench")
    stamp = stamped(unstamped, {"dataversion": "3"}).extensions
    if model(v3) != Liked(**current_data(7)):
        raise RuntimeError("the bench's model does not validate")
    loops: dict[str, tuple[Callable[[Event], Any], Event]] = {
        "current": (read, v3),
        "one_step": (read, v2),
        "model": (model, v3),
        "pydantic": (lambda event: validate(event.data), v3),
        "upcaster": (lambda event: _v2_to_v3(event.data), v2),
        "floor": (lambda event: stamped(event, stamp), unstamped),
    }
    times: dict[str, list[float]] = {name: [] for name in loops}
    for call, event in loops.values():  # warm-up
        _loop(call, event, sizes.reads // 10)
    names = tuple(loops)
    for round_ in range(sizes.read_rounds):
        gc.collect()
        for name in names if round_ % 2 == 0 else names[::-1]:
            call, event = loops[name]
            times[name].append(_loop(call, event, sizes.reads))
    steps = [s - c for s, c in zip(times["one_step"], times["current"], strict=True)]
    note(
        f"read: {sizes.read_rounds} rounds x {sizes.reads} calls; µs per read with nothing "
        f"to do {_rounded(times['current'])}, with one step {_rounded(times['one_step'])}; "
        f"the upcaster alone {median(times['upcaster']):.3f} µs; EventTypes.model "
        f"{_rounded(times['model'])}, Liked.model_validate alone "
        f"{median(times['pydantic']):.3f} µs (medians reported)"
    )
    return [
        Figure("versioning_read_current", median(times["current"]), "µs"),
        Figure("versioning_upcast_step", median(steps), "µs"),
        Figure("versioning_model_validate", median(times["model"]), "µs"),
        Figure("versioning_floor_event_build", median(times["floor"]), "µs"),
    ]


# worker ------------------------------------------------------------------------


def _pending(bus: EventBus, count: int, upcast: bool) -> list[RetryItem]:
    """``count`` due pending deliveries, as ``publish(defer=True)`` records them:
    of v1 events (no ``dataversion``: both upcasters to run) or of current ones."""
    now = bus.clock.now()
    max_retries = bus.policy_for(HANDLER).max_retries
    items = []
    for n in range(count):
        if upcast:
            event = Event(REGISTERED, v1_data(n), source="bench")
        else:
            event = Event(
                REGISTERED, current_data(n), source="bench", extensions={"dataversion": "3"}
            )
        items.append(RetryItem.pending(event, HANDLER, max_retries=max_retries, due=now, now=now))
    return items


async def _worker_round(url: str, count: int, upcast: bool) -> float:
    bus = _bus(url)
    try:
        await bus.store.record_pending(_pending(bus, count, upcast))
        worker = RetryWorker(bus)
        gc.collect()
        handled = 0
        begin = time.perf_counter_ns()
        while done := await worker.run_once():
            handled += done
        elapsed = (time.perf_counter_ns() - begin) / 1e9
        left = await bus.store.retry_count()
    finally:
        await bus.close()
    if handled != count or left:
        raise RuntimeError(f"worker handled {handled} of {count}, {left} left")
    return handled / elapsed


async def measure_worker(store: str, sizes: Sizes) -> list[Figure]:
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="retrybus-bench-") as directory:

        def url() -> str:
            if store == "memory":
                return "memory://"
            return f"sqlite:///{os.path.join(directory, os.urandom(4).hex() + '.db')}"

        for upcast in (False, True):  # warm-up
            await _worker_round(url(), 200, upcast)
        for round_ in range(sizes.worker_rounds):
            for upcast in (False, True) if round_ % 2 == 0 else (True, False):
                rates[upcast].append(await _worker_round(url(), sizes.worker_items, upcast))
    ratios = [u / c for u, c in zip(rates[True], rates[False], strict=True)]
    note(
        f"worker {store}: {sizes.worker_rounds} rounds x {sizes.worker_items} items of each; "
        f"current {[round(r) for r in rates[False]]}, v1 (two upcasts) "
        f"{[round(r) for r in rates[True]]} items/s (medians reported)"
    )
    return [
        Figure(f"versioning_worker_current_{store}", median(rates[False]), "items/s"),
        Figure(f"versioning_worker_upcast_{store}", median(rates[True]), "items/s"),
        Figure(f"versioning_worker_slowdown_{store}", (1 - median(ratios)) * 100, "%"),
    ]


# profile -----------------------------------------------------------------------


async def profile(directory: str, sizes: Sizes) -> None:
    """cProfile the hot paths into ``directory``: a registered publish loop on the
    memory store, the read loops and a v1 worker drain on the memory store."""
    os.makedirs(directory, exist_ok=True)
    bus = _bus("memory://")
    events = _events("registered", sizes.memory_block * 5)
    with cProfile.Profile() as profiler:
        await _publish_block(bus, events, False)
    profiler.dump_stats(os.path.join(directory, "publish_registered_memory.prof"))
    await bus.close()
    types = EventTypes()
    register(types.register)
    v2 = Event(REGISTERED, v2_data(7), source="bench", extensions={"dataversion": "2"})
    with cProfile.Profile() as profiler:
        _loop(types.read, v2, sizes.reads)
    profiler.dump_stats(os.path.join(directory, "read_one_step.prof"))
    with cProfile.Profile() as profiler:
        await _worker_round("memory://", sizes.worker_items, True)
    profiler.dump_stats(os.path.join(directory, "worker_upcast_memory.prof"))
    note(f"profiles in {directory}")


async def measure(sizes: Sizes, parts: tuple[str, ...] = PARTS) -> list[Figure]:
    quiet_logging()
    figures: list[Figure] = []
    if "publish" in parts:
        with tempfile.TemporaryDirectory(prefix="retrybus-bench-") as directory:
            figures += await measure_publish("memory", "memory://", sizes)
            figures += await measure_publish(
                "sqlite", f"sqlite:///{os.path.join(directory, 'publish.db')}", sizes
            )
    if "read" in parts:
        figures += measure_reads(sizes)
        built = {f.name: f.value for f in figures}
        if "versioning_publish_unregistered_memory" in built:
            floor = built["versioning_floor_event_build"]
            share = 100 * floor / built["versioning_publish_unregistered_memory"]
            figures.append(Figure("versioning_floor_share_memory", share, "%"))
    if "worker" in parts:
        figures += await measure_worker("memory", sizes)
        figures += await measure_worker("sqlite", sizes)
    return figures


def run() -> list[Figure]:
    return asyncio.run(measure(Sizes()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to try it out")
    parser.add_argument("--profile", metavar="DIR", help="cProfile the hot paths into DIR")
    args = parser.parse_args()
    parts = tuple(p for p in args.only.split(",") if p)
    if set(parts) - set(PARTS):
        parser.error(f"unknown part: {', '.join(sorted(set(parts) - set(PARTS)))}")
    sizes = QUICK if args.quick else Sizes()
    if args.profile:
        quiet_logging()
        asyncio.run(profile(args.profile, sizes))
        return
    emit(asyncio.run(measure(sizes, parts)))


if __name__ == "__main__":
    main()
