"""Whether a DP session's noise drowns its signal, and what to change (the dashboard header
and ``xflwb.report`` show it).

The rule. Each round the server averages n clipped updates (each of L2 norm ≤ C) and adds
Gaussian noise of std z·C/n per coordinate (``xflwb.federation.dp``). Over d parameters
the mean of the clipped updates has norm at most C, so its typical per-coordinate size is
at most C/√d — reached only when every client's update is clipped to C and all point the
same way. The noise's per-coordinate std is z·C/n. So

    noise / signal per coordinate  ≥  (z·C/n) / (C/√d)  =  z·√d / n,

and when z·√d/n > 1 even the best round is more noise than update: training sits at
chance, as a 4-client run does. C cancels: a larger clipping norm scales the noise with the
largest possible update, so it cannot fix this (a norm far above the updates' real norms
makes it worse). What does: more clients per round (n > z·√d) or a lower
noise_multiplier (z < n/√d, which spends more ε per round).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def noise_to_signal(noise_multiplier: float, parameters: int, clients: int) -> float:
    """z·√d/n: the noise's per-coordinate std over the largest per-coordinate size of the
    clipped mean update (> 1: the noise drowns every round's update)."""
    if clients <= 0:
        return math.inf
    return float(noise_multiplier) * math.sqrt(max(int(parameters), 1)) / int(clients)


def clients_per_round(config: dict[str, Any], history: pd.DataFrame | None) -> int | None:
    """How many clients a round averages: the last round's ``clients`` (platform ``all``),
    or before the first round the config's ``min_clients``; None if neither is known."""
    if history is not None and len(history):
        rows = history[(history["metric"] == "clients") & (history["platform"] == "all")]
        values = rows["value"].dropna()
        if len(values) and float(values.iloc[-1]) > 0:
            return int(values.iloc[-1])
    n = config.get("min_clients")
    return int(n) if isinstance(n, int | float) and n and n > 0 else None


def noise_warning(config: dict[str, Any], parameters: int | None,
                  history: pd.DataFrame | None = None) -> str | None:
    """The warning for a session's config (its ``privacy`` dict), its model's trained
    parameter count and its history so far; None when the rule holds or cannot be
    judged (no DP, no noise, unknown size or clients)."""
    privacy = config.get("privacy") or {}
    z = float(privacy.get("noise_multiplier") or 0)
    n = clients_per_round(config, history)
    if not z or not parameters or not n:
        return None
    ratio = noise_to_signal(z, parameters, n)
    if ratio <= 1:
        return None
    need = math.floor(z * math.sqrt(parameters)) + 1
    z_max = n / math.sqrt(parameters)
    return (f"the noise drowns the updates: noise std per coordinate z·C/n is {ratio:.3g}× "
            f"the largest clipped mean update C/√d (noise_multiplier {z:g}, {n} clients per "
            f"round, {parameters} parameters). Fix: more clients per round (at least {need}) "
            f"or a lower noise_multiplier (below {z_max:.3g}, more ε per round); a larger "
            f"clipping_norm does not help (it scales the noise too).")
