"""The consumer side of the peers benchmark, the same in every system's consumer
process: the handler calls ``hit()`` (and ``first(key)`` in the fail-once phase,
``lap(sent_ns)`` in the latency one); the system's own start-up hook calls
``ready()``. Nothing else of the benchmark runs in the consumer.

The file protocol (``PEERS_PROBE`` names the file; the orchestrator reads it):
a daemon thread started by ``ready()`` rewrites it, atomically (a temporary
file renamed over it), every 20 ms while something changed, as one JSON object:

    {"pid": ..., "ready": READY_NS, "hits": N, "calls": C, "done": DONE_NS or null,
     "hwm_kb": VmHWM, "rss_kb": VmRSS, "latencies_ns": [...] (once done)}

READY_NS and DONE_NS are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by the
processes of a machine): READY when the system says it is consuming, DONE at the
``PEERS_TARGET``-th ``hit()`` (read inside ``hit()`` itself, not by the thread).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time

_path = os.environ.get("PEERS_PROBE", "")
_target = int(os.environ.get("PEERS_TARGET", "0") or 0)
_counter = itertools.count(1)
_hits = 0
_calls = 0  # every call of the handler, failed ones too (progress, for the stall check)
_ready_ns: int | None = None
_done_ns: int | None = None
_latencies: list[int] = []
_seen: set[object] = set()
_thread: threading.Thread | None = None
_lock = threading.Lock()


def call() -> None:
    """The handler was called (it may still fail). Not exact across threads: progress only."""
    global _calls
    _calls += 1


def hit() -> None:
    """One handler call succeeded (the no-op handler's only work)."""
    global _hits, _done_ns
    n = next(_counter)  # atomic under the GIL, from any thread
    _hits = n
    if n == _target:
        _done_ns = time.monotonic_ns()


def first(key: object) -> bool:
    """True the first time ``key`` is seen in this process (fail-once: raise then)."""
    if key in _seen:
        return False
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
        return True


def lap(sent_ns: int) -> None:
    """Publish-to-handler latency of one event carrying its ``time.time_ns()`` at publish."""
    _latencies.append(time.time_ns() - sent_ns)


def ready() -> None:
    """The system is consuming: the clock starts. Starts the writer thread (once)."""
    global _ready_ns, _thread
    if _ready_ns is None:
        _ready_ns = time.monotonic_ns()
    if _thread is None and _path:
        _thread = threading.Thread(target=_write_continuously, name="peers-probe", daemon=True)
        _thread.start()


def _memory_kb() -> tuple[int, int]:
    hwm = rss = 0
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return hwm, rss


def _state() -> dict[str, object]:
    hwm, rss = _memory_kb()
    done = _done_ns
    return {
        "pid": os.getpid(),
        "ready": _ready_ns,
        "hits": _hits,
        "calls": _calls,
        "done": done,
        "hwm_kb": hwm,
        "rss_kb": rss,
        "latencies_ns": list(_latencies) if done is not None else None,
    }


def _write(state: dict[str, object]) -> None:
    temporary = f"{_path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(state, out)
    os.replace(temporary, _path)


def _write_continuously() -> None:
    last: tuple[object, ...] | None = None
    while True:
        key = (_ready_ns, _hits, _calls, _done_ns)
        if key != last:
            _write(_state())
            last = key
        time.sleep(0.02)
