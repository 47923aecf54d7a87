"""Test support without heavy imports: ``wait_until``, the one way a test waits for something
that happens in another thread or process.

A wait is not a measurement: the timeout only bounds how long a broken run hangs, and a wait
that gives up says what it waited for and what it saw last, so the failure reads as a bug
report rather than "timed out".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: first pause between polls (s); each pause doubles up to ``max_pause``
FIRST_PAUSE = 0.01
#: how much of a value or description a failure quotes (characters)
QUOTE = 3000


def _quote(value: object) -> str:
    try:
        text = value if isinstance(value, str) else repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the wait's own failure
        text = f"<unprintable {type(value).__name__}: {exc!r}>"
    return text if len(text) <= QUOTE else text[:QUOTE] + f"… ({len(text)} characters)"


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *,
               describe: Callable[[], object] | None = None,
               max_pause: float = 0.2) -> T:
    """Poll ``predicate()`` until it returns something truthy, and return that value.

    Between polls it sleeps ``FIRST_PAUSE`` s, doubling up to ``max_pause`` (a quick event is
    seen quickly, a slow one does not spin the CPU; ``max_pause=0`` for a predicate that
    blocks on its own, such as a read with a timeout). An exception from ``predicate`` counts
    as "not yet" and is retried (a server still starting refuses connections); to give up
    at once (the awaited thing can no longer happen), the predicate calls ``pytest.fail``,
    which is not an ``Exception`` and so goes straight through.

    After ``timeout`` seconds (the predicate is polled once more at the deadline) it raises
    ``AssertionError`` naming ``what``, the predicate's last value or exception (chained, so
    pytest shows its traceback), and ``describe()`` when given (state worth seeing, such as
    a session's log tail)."""
    deadline = time.monotonic() + timeout
    pause = min(FIRST_PAUSE, max_pause)
    last: object = None
    error: Exception | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:
            error, last = exc, None
        else:
            if value:
                return value
            error, last = None, value
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(pause, left))
        pause = min(pause * 2, max_pause)
    seen = (f"the predicate last raised {type(error).__name__}: {_quote(str(error))}"
            if error is not None else f"last value: {_quote(last)}")
    message = f"gave up after {timeout:g} s waiting for {what}; {seen}"
    if describe is not None:
        try:
            message += f"\n{_quote(describe())}"
        except Exception as exc:
            message += f"\n(describe() raised {type(exc).__name__}: {exc})"
    raise AssertionError(message) from error


#: history metrics measured on the wall clock: they differ between two runs of one seed
WALL_CLOCK = {"fit_seconds", "aggregate_seconds"}


def comparable(history) -> list[tuple]:
    """A history's rows without the wall-clock measurements."""
    rows = history[~history.metric.isin(WALL_CLOCK)]
    return [tuple(r) for r in rows[["round", "platform", "metric", "value"]].itertuples(
        index=False)]


def assert_same_run(a, b) -> None:
    """Two finished sessions of one seed agree: who trained, every metric, the model."""
    import numpy as np

    assert a.status == b.status == "finished"
    ha, hb = comparable(a.history), comparable(b.history)
    assert len(ha) > 20 and ha == hb
    for x, y in zip(a.global_parameters(), b.global_parameters(), strict=True):
        np.testing.assert_array_equal(x, y)
