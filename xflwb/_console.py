"""What the ``xflwb`` command and ``make demo`` print: tables with integers as integers, and a
round progress bar while a session or simulation trains (otherwise 40 s of silence)."""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any

import numpy as np
import pandas as pd

#: Column names that hold real-valued measurements even when a value happens to be whole.
FLOAT_HINTS = ("loss", "acc", "second", "err", "tol", "rate", "fraction", "time", "spread",
               "alpha", "lr", "mean", "std")


def _integral(col: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_float_dtype(col):
        return False
    if any(h in str(col.name).lower() for h in FLOAT_HINTS):
        return False
    vals = col.dropna().to_numpy()
    return bool(len(vals)) and bool(np.isfinite(vals).all()) and bool(
        (vals == np.round(vals)).all())


def integers_as_integers(df: pd.DataFrame) -> pd.DataFrame:
    """A copy whose whole-number float columns (counts: clients, examples, bytes, rejected;
    pivot tables make them floats) are integers; measurements stay floats."""
    out = df.copy()
    for c in out.columns:
        if _integral(out[c]):
            out[c] = out[c].round().astype("Int64")
    return out


def format_table(df: pd.DataFrame, decimals: int = 4, index: bool = False) -> str:
    """``df.to_string`` with counts as ``4`` / ``1438`` and measurements with ``decimals``."""
    if index:
        df = df.reset_index()
    table: str = integers_as_integers(df).to_string(  # pandas is untyped here
        index=False, float_format=lambda v: f"{v:.{decimals}f}")
    return table


def wait(session: Any, rounds: int, timeout: float | None = None, progress: bool = True,
         every: float = 0.5) -> str:
    """``session.wait(timeout)`` with a tqdm bar of finished rounds (``desc="round"``).

    The waiting, its errors and its return value are ``session.wait``'s own; a background
    thread only reads ``session.round`` (and what the session is doing) for the bar, as the
    dashboard does.
    """
    if not progress:
        status: str = session.wait(timeout=timeout)
        return status
    from tqdm.auto import tqdm

    bar = tqdm(total=rounds, desc="round", unit="round", file=sys.stderr, dynamic_ncols=True)
    done = threading.Event()
    # a terminal redraws the clock every tick; a log file gets a line only on news
    tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    last: list[Any] = [None]

    def update() -> None:
        with contextlib.suppress(Exception):  # a bar must never break the wait
            r = min(int(session.round), rounds)
            doing = getattr(session, "doing", None)
            what = str(doing()) if callable(doing) else ""
            if r > bar.n:
                bar.update(r - bar.n)
            bar.set_postfix_str(what, refresh=False)
            if tty or (r, what) != last[0]:
                bar.refresh()
            last[0] = (r, what)

    def loop() -> None:
        while not done.wait(every):
            update()

    thread = threading.Thread(target=loop, name="xflwb-progress", daemon=True)
    thread.start()
    try:
        status = session.wait(timeout=timeout)
        return status
    finally:
        done.set()
        thread.join()
        update()
        bar.close()
