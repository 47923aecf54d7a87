"""``wait_until`` (tests/support.py): what it returns, and what a wait that gives up says.
Counts polls, never durations: a timeout of 0 means "poll once", and the waits that succeed
do so on a known poll."""

from __future__ import annotations

import itertools

import pytest

from tests.support import wait_until


def test_returns_the_first_truthy_value_and_stops_polling():
    polls = itertools.count(1)
    seen: list[int] = []

    def third_time() -> dict[str, int] | None:
        n = next(polls)
        seen.append(n)
        return {"round": n} if n == 3 else None

    assert wait_until(third_time, 60, "round 3") == {"round": 3}
    assert seen == [1, 2, 3]


def test_an_immediately_true_predicate_is_polled_once():
    calls: list[int] = []
    assert wait_until(lambda: calls.append(1) or "up", 60, "the server") == "up"
    assert calls == [1]


def test_timing_out_names_what_it_waited_for_and_the_last_value():
    with pytest.raises(AssertionError) as err:
        wait_until(lambda: [], 0, "the fleet to empty")
    text = str(err.value)
    assert "waiting for the fleet to empty" in text
    assert "last value: []" in text
    assert err.value.__cause__ is None


def test_the_last_value_is_the_one_quoted():
    values = iter([0, "", None, 0.0])
    # timeout 0: exactly one poll, so the first value is the last one seen
    with pytest.raises(AssertionError, match=r"last value: 0$"):
        wait_until(lambda: next(values), 0, "a value")


def test_exceptions_are_retried_and_the_last_one_is_quoted_and_chained():
    polls = itertools.count(1)

    def flaky() -> str:
        n = next(polls)
        if n < 3:
            raise ConnectionRefusedError(f"refused on poll {n}")
        return "connected"

    assert wait_until(flaky, 60, "the connection") == "connected"

    def refusing() -> str:
        raise ConnectionRefusedError(f"refused on poll {next(polls)}")

    with pytest.raises(AssertionError) as err:
        wait_until(refusing, 0, "the server to accept")
    text = str(err.value)
    assert "waiting for the server to accept" in text
    assert "ConnectionRefusedError: refused on poll 4" in text
    assert isinstance(err.value.__cause__, ConnectionRefusedError)


class FakeClock:
    """Stands in for ``time`` inside tests/support.py: ``sleep`` advances ``monotonic``."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    from tests import support

    fake = FakeClock()
    monkeypatch.setattr(support, "time", fake)
    return fake


def test_a_value_after_an_exception_replaces_it_as_the_last_thing_seen(clock):
    polls = itertools.count(1)

    def predicate() -> None:
        if next(polls) == 1:
            raise KeyError("victim")
        return None

    with pytest.raises(AssertionError) as err:
        wait_until(predicate, 1, "the victim training")
    assert "last value: None" in str(err.value) and "KeyError" not in str(err.value)
    assert err.value.__cause__ is None


def test_pauses_back_off_to_max_pause_and_the_deadline_is_polled(clock):
    polls: list[float] = []
    with pytest.raises(AssertionError, match="gave up after 1 s"):
        wait_until(lambda: polls.append(clock.now), 1, "never", max_pause=0.2)
    assert clock.pauses[:5] == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16])
    assert set(clock.pauses[5:-1]) == {0.2}
    assert sum(clock.pauses) == pytest.approx(1.0)  # the last pause ends at the deadline
    assert polls[0] == 1000.0 and polls[-1] == pytest.approx(1001.0)
    assert len(polls) == len(clock.pauses) + 1


def test_max_pause_0_polls_back_to_back(clock):
    polls = itertools.count(1)
    assert wait_until(lambda: next(polls) == 5, 1, "poll 5", max_pause=0)
    assert clock.pauses == [0, 0, 0, 0]


def test_describe_adds_state_to_the_failure():
    with pytest.raises(AssertionError) as err:
        wait_until(lambda: False, 0, "round 2", describe=lambda: "session log: round 1 failed")
    assert str(err.value).endswith("\nsession log: round 1 failed")


def test_a_failing_describe_does_not_hide_the_wait():
    def broken() -> str:
        raise RuntimeError("log gone")

    with pytest.raises(AssertionError) as err:
        wait_until(lambda: False, 0, "round 2", describe=broken)
    assert "waiting for round 2" in str(err.value)
    assert "describe() raised RuntimeError: log gone" in str(err.value)


def test_long_values_are_shortened():
    class Empty:
        def __bool__(self) -> bool:
            return False

        def __repr__(self) -> str:
            return "Empty(" + "y" * 9_993 + ")"

    with pytest.raises(AssertionError) as err:
        wait_until(Empty, 0, "a value", describe=lambda: "z" * 20_000)
    text = str(err.value)
    assert "(10000 characters)" in text and "(20000 characters)" in text
    assert len(text) < 7000


def test_pytest_fail_in_the_predicate_gives_up_at_once():
    calls: list[int] = []

    def crashed() -> bool:
        calls.append(1)
        pytest.fail("the session crashed")

    with pytest.raises(pytest.fail.Exception, match="the session crashed"):
        wait_until(crashed, 60, "round 1")
    assert calls == [1]


def test_keyboard_interrupt_is_not_swallowed():
    def interrupted() -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wait_until(interrupted, 60, "anything")
