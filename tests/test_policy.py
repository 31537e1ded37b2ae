from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrybus import ExponentialBackoff, FixedDelay, LinearBackoff, PermanentError, RetryPolicy


def test_the_seed_defaults() -> None:
    policy = ExponentialBackoff()
    assert policy.max_retries == 3
    assert (policy.initial_delay, policy.max_delay, policy.multiplier, policy.randomization) == (
        1.0,
        60.0,
        2.0,
        0.1,
    )
    assert FixedDelay().max_retries == 3
    assert FixedDelay().delay(1) == 1.0
    linear = LinearBackoff()
    assert [linear.delay(n) for n in (1, 2, 3)] == [1.0, 2.0, 3.0]


def test_exponential_delays_double_within_ten_percent() -> None:
    policy = ExponentialBackoff()
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)):
        for _ in range(200):
            assert base * 0.9 <= policy.delay(attempt) <= base * 1.1


def test_exponential_delay_is_capped_at_max_delay() -> None:
    policy = ExponentialBackoff(max_retries=100, randomization=0)
    assert policy.delay(7) == 60.0
    assert policy.delay(10_000) == 60.0


def test_linear_delay_is_capped() -> None:
    policy = LinearBackoff(initial_delay=1, increment=10, max_delay=15)
    assert [policy.delay(n) for n in (1, 2, 3)] == [1.0, 11.0, 15.0]


@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    initial=st.floats(min_value=0, max_value=100),
    multiplier=st.floats(min_value=1, max_value=10),
    randomization=st.floats(min_value=0, max_value=1),
)
def test_exponential_delay_never_leaves_its_jitter_band(
    attempt: int, initial: float, multiplier: float, randomization: float
) -> None:
    policy = ExponentialBackoff(
        max_retries=5,
        initial_delay=initial,
        max_delay=max(initial, 120.0),
        multiplier=multiplier,
        randomization=randomization,
    )
    base = policy.base_delay(attempt)
    assert 0 <= base <= policy.max_delay
    delay = policy.delay(attempt)
    assert base * (1 - randomization) - 1e-9 <= delay <= base * (1 + randomization) + 1e-9


@given(attempt=st.integers(min_value=1, max_value=50))
def test_delays_never_shrink_as_attempts_grow(attempt: int) -> None:
    for policy in (ExponentialBackoff(randomization=0), LinearBackoff(), FixedDelay()):
        assert policy.delay(attempt + 1) >= policy.delay(attempt)  # type: ignore[attr-defined]


def test_should_retry_stops_after_max_retries() -> None:
    policy = FixedDelay(max_retries=3)
    error = TimeoutError("connection timeout")
    assert [policy.should_retry(error, n) for n in (1, 2, 3, 4)] == [True, True, True, False]


def test_permanent_errors_are_never_retried() -> None:
    assert not ExponentialBackoff().should_retry(PermanentError("gone"), 1)


def test_retry_on_limits_what_is_retried() -> None:
    policy = ExponentialBackoff(retry_on=(ConnectionError, TimeoutError))
    assert policy.should_retry(TimeoutError(), 1)
    assert not policy.should_retry(ValueError(), 1)


def test_give_up_on_wins_over_retry_on() -> None:
    policy = FixedDelay(retry_on=OSError, give_up_on=FileNotFoundError)
    assert policy.should_retry(ConnectionError(), 1)
    assert not policy.should_retry(FileNotFoundError(), 1)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: ExponentialBackoff(initial_delay=-1), "initial_delay"),
        (lambda: ExponentialBackoff(max_delay=-1), "max_delay"),
        (lambda: ExponentialBackoff(multiplier=0.5), "multiplier"),
        (lambda: ExponentialBackoff(randomization=1.5), "randomization"),
        (lambda: ExponentialBackoff(randomization=-0.1), "randomization"),
        (lambda: ExponentialBackoff(max_retries=-1), "max_retries"),
        (lambda: FixedDelay(delay=-0.5), "delay"),
        (lambda: FixedDelay(max_retries=-2), "max_retries"),
        (lambda: LinearBackoff(increment=-1), "increment"),
        (lambda: LinearBackoff(initial_delay=float("inf")), "initial_delay"),
        (lambda: FixedDelay(max_elapsed=-1), "max_elapsed"),
    ],
)
def test_invalid_parameters_raise_value_error_naming_the_parameter(make: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()  # type: ignore[operator]


def test_policies_implement_the_protocol() -> None:
    for policy in (ExponentialBackoff(), FixedDelay(), LinearBackoff()):
        assert isinstance(policy, RetryPolicy)


def test_repr_shows_the_parameters() -> None:
    assert repr(FixedDelay(max_retries=2, delay=0.5)) == "FixedDelay(max_retries=2, delay=0.5)"
