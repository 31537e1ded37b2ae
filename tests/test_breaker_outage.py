"""A dependency down for 60 s under 10,000 events across two worker processes
(issue 16), on PostgreSQL (a schema per run), with tests/outage_run.py.

The load: 10,000 events published with ``defer=True`` at a steady rate over
85 s (about 118/s: the workers make the first deliveries); the dependency (a
file the handler checks: present, the handler raises ``ConnectionError``) is
down from 15 s to 75 s. The policy is ``ExponentialBackoff(max_retries=4,
initial_delay=1, max_delay=8)``: a delivery failing throughout dies some 15 s
after its first call, well within the outage.

- With ``CircuitBreaker(min_calls=20, window=10, open_for=10,
  max_open_for=20, probes=3)``: no call while it is open but those of a process
  that did not know yet, probes alone while it is half-open, no dead letter,
  every event handled successfully once, and the success rate back to the
  pre-outage rate within ``open_for`` (as it stood: doubled by reopenings) plus
  one claim interval of the dependency's recovery.
- Without a breaker, the same run for comparison: the dead letters and calls
  are printed; nothing is lost.
- With a retry budget (``RetryBudget(percent=20, min_per_second=1, window=10)``)
  and no breaker: the retries of any period of the outage stay within 20 % of
  the first deliveries made then and in the window before (the budget's
  allowance reaches back one window): the calls come to about 1.2 times the
  first deliveries; nothing is lost.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from outage_run import OutageRun, Scenario, run_outage

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(420)]

POLICY = {"max_retries": 4, "initial_delay": 1, "max_delay": 8}
BREAKER = {
    "failure_ratio": 0.5,
    "min_calls": 20,
    "window": 10,
    "open_for": 10,
    "max_open_for": 20,
    "probes": 3,
}
#: the workers' claim interval (``check_interval``): the longest a worker sleeps
CLAIM_INTERVAL = 1.0
WORKER = {"check_interval": CLAIM_INTERVAL, "batch_size": 50, "concurrency": 16, "lease": 30}
#: a process whose calls fail re-reads the breakers' shared state this long after
#: its last read (README: 0.5 s), at its next claim: a process that has not
#: tripped the breaker itself learns it opened by then
REFRESH = 0.5 + CLAIM_INTERVAL


def summary(name: str, run: OutageRun) -> str:
    """What the run gave, for the README's figures."""
    at = run.started
    lines = [
        f"{name}: {len(run.published)} events, {len(run.calls)} calls "
        f"({len(run.failures())} failed), {sum(run.dead_letters.values())} dead letters, "
        f"{len(run.successes())} events handled successfully; "
        f"dependency down {run.down - at:.1f}s..{run.up - at:.1f}s",
    ]
    for period in run.periods:
        ended = "-" if period.ended_at is None else f"{period.ended_at - at:.1f}s"
        lines.append(
            f"  trip {period.trip}: open at {period.opened_at - at:.1f}s for {period.open_for:g}s, "
            f"half-open at {period.half_open_at - at:.1f}s, ended {ended}"
        )
    return "\n".join(lines)


async def test_a_breaker_holds_deliveries_through_an_outage(tmp_path: Path) -> None:
    run = await run_outage(Scenario(policy=POLICY, breaker=BREAKER, worker=WORKER), tmp_path)
    print(summary("with a breaker", run))
    periods = run.periods
    assert periods, run.logs
    assert [p.trip for p in periods] == list(range(1, len(periods) + 1))
    assert all(p.ended_at is not None for p in periods), run.statuses[-1]
    assert run.statuses[-1]["state"] == "closed"

    # open: the only calls are those of a process that still knew it closed (it
    # had not tripped the breaker itself), started before its next refresh
    while_open = run.calls_while_open()
    late = [
        call
        for call in while_open
        if call.state != "closed"
        or not any(p.holds_open(call.start) and call.start < p.opened_at + REFRESH for p in periods)
    ]
    lag = max(
        (c.start - p.opened_at for c in while_open for p in periods if p.holds_open(c.start)),
        default=0.0,
    )
    print(
        f"  calls while open: {len(while_open)}, by processes that did not know yet "
        f"(the last {lag:.2f}s after it opened)"
    )
    assert not late, late[:10]
    # half-open: the probes alone, at most ``probes`` per opening, across both processes
    probes = run.calls_while_half_open()
    print(
        f"  probes: {sum(len(calls) for calls in probes.values())} "
        f"({[len(calls) for _, calls in sorted(probes.items())]} per half-open period)"
    )
    assert all(len(calls) <= BREAKER["probes"] for calls in probes.values()), probes
    assert all(call.state == "half_open" for calls in probes.values() for call in calls)
    probe_calls = {call for calls in probes.values() for call in calls}
    assert not [c for c in run.calls if c.state == "half_open" and c not in probe_calls]
    assert not [c for c in run.calls if c.state in ("open", "isolated")]
    # no attempt used while it was open: each failure came before it opened, from a
    # process that did not know yet, or was a probe
    first_open = periods[0].opened_at
    open_calls = set(while_open)
    unexplained = [
        call
        for call in run.failures()
        if call.start >= first_open and call not in probe_calls and call not in open_calls
    ]
    assert not unexplained, unexplained[:10]
    attempts = run.attempts()
    print(f"  calls per event: {sorted(Counter(attempts.values()).items())}")
    # nothing lost, nothing dead-lettered, each event handled successfully once
    assert not run.dead_letters
    assert run.retry_queue_left == 0
    successes = run.successes()
    assert successes.keys() == run.published.keys()
    assert set(successes.values()) == {1}
    # back to the pre-outage rate within open_for (as it stood) + one claim interval
    rate = run.success_rate(run.started + 5, run.down)
    recovered = run.recovered_at(0.9 * rate, step=0.5)
    assert recovered is not None
    open_for = [p for p in periods if p.opened_at < run.up][-1].open_for
    print(
        f"  pre-outage {rate:.1f} successes/s; back to it {recovered - run.up:.1f}s after "
        f"the dependency (open_for then {open_for:g}s, claim interval {CLAIM_INTERVAL:g}s)"
    )
    assert recovered - run.up <= open_for + CLAIM_INTERVAL + 0.5


async def test_without_a_breaker_the_outage_fills_the_dead_letter_queue(tmp_path: Path) -> None:
    run = await run_outage(Scenario(policy=POLICY, breaker=None, worker=WORKER), tmp_path)
    print(summary("without a breaker", run))
    assert run.retry_queue_left == 0
    successes = run.successes()
    assert not successes.keys() & run.dead_letters.keys()
    assert len(successes) + sum(run.dead_letters.values()) == len(run.published)
    assert successes.keys() | run.dead_letters.keys() == run.published.keys()


async def test_a_retry_budget_bounds_the_calls_during_an_outage(tmp_path: Path) -> None:
    budget = {"percent": 20, "min_per_second": 1, "window": 10}
    worker = {**WORKER, "retry_budget": budget}
    run = await run_outage(Scenario(policy=POLICY, breaker=None, worker=worker), tmp_path)
    print(summary("with a retry budget", run))
    first_calls = run.first_calls()
    window = budget["window"]

    def count(start: float, end: float) -> tuple[int, int]:
        """(calls, first deliveries) started in [start, end)."""
        calls = [c for c in run.calls if start <= c.start < end]
        return len(calls), sum(1 for c in calls if first_calls[c.event_id] is c)

    calls, first_deliveries = count(run.down, run.up)
    print(
        f"  during the outage: {calls} calls for {first_deliveries} first deliveries "
        f"({calls / first_deliveries:.3f}x)"
    )
    # the budget's own bound: the retries of any period stay within 20 % of the first
    # deliveries of that period and of the window before it (its allowance reaches
    # back one window: a share of the last `window` seconds' first deliveries)
    for start in (run.down, run.down + window, run.down + 2 * window):
        calls, first_deliveries = count(start, run.up)
        _, allowing = count(start - window, run.up)
        retries = calls - first_deliveries
        print(
            f"  from {start - run.started:.0f}s: {retries} retries for {first_deliveries} first "
            f"deliveries ({calls / first_deliveries:.3f}x), {allowing} in the window before too"
        )
        assert retries <= 0.2 * allowing
    assert calls / first_deliveries <= 1.25
    # nothing lost: every event handled once or dead-lettered (its retries used up)
    assert run.retry_queue_left == 0
    successes = run.successes()
    assert not successes.keys() & run.dead_letters.keys()
    assert successes.keys() | run.dead_letters.keys() == run.published.keys()
    assert set(successes.values()) == {1}
