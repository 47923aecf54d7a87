"""Headless experiments: execute a notebook with papermill, collect its results CSV.

The notebook declares a ``parameters`` cell (papermill's convention) including
``results_path``, and writes its long-format results (a ``platform`` column) there. A grid
runs every combination and writes one combined CSV and a comparison plot.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd


def parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"0.5"`` → 0.5, ``"True"`` → True; anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid expects key=v1,v2,..., got {item!r}")
        key, values = item.split("=", 1)
        grid[key.strip()] = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
        if not grid[key.strip()]:
            raise ValueError(f"--grid {key}: no values")
    return grid


def run(notebook: str | Path, out_dir: str | Path, parameters: Mapping[str, Any] | None = None,
        grid: Mapping[str, Sequence[Any]] | None = None, kernel_name: str | None = None,
        progress: bool = False) -> pd.DataFrame:
    """Execute ``notebook`` once per grid combination; returns the combined results."""
    import papermill as pm

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"no notebook at {notebook}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(parameters or {})
    grid = grid or {}
    keys = list(grid.keys())
    combos = list(itertools.product(*[list(grid[k]) for k in keys])) if keys else [()]
    frames = []
    for i, combo in enumerate(combos):
        params = {**base, **dict(zip(keys, combo, strict=True))}
        tag = "" if not keys else "-" + "-".join(f"{k}={v}" for k, v in zip(keys, combo,
                                                                            strict=True))
        stem = f"{notebook.stem}{tag}" if keys else notebook.stem
        executed = out / f"{stem}.ipynb"
        if executed.exists():
            raise FileExistsError(f"{executed} exists; results are never overwritten: use "
                                  "another --out directory")
        results = (out / f"{stem}-results.csv").resolve()
        params["results_path"] = str(results)
        pm.execute_notebook(str(notebook), str(executed), parameters=params,
                            kernel_name=kernel_name, progress_bar=progress,
                            cwd=str(notebook.parent))
        if not results.exists():
            raise RuntimeError(f"{notebook} ran but wrote no results to results_path "
                               f"({results})")
        df = pd.read_csv(results)
        if "platform" not in df.columns:
            raise RuntimeError(f"{results} has no 'platform' column")
        for k, v in params.items():
            if k != "results_path" and k not in df.columns:  # the notebook's own column wins
                # a list parameter (a sweep inside the notebook) is one value of this run
                df[k] = str(v) if isinstance(v, list | tuple | dict) else v
        df["run"] = i
        frames.append(df)
    combined = pd.concat(frames, ignore_index=True)
    combined.to_csv(out / "results.csv", index=False)
    if keys:
        _comparison_plot(combined, keys, out / "comparison.png")
    return combined


def _comparison_plot(df: pd.DataFrame, keys: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = comparison_figure(df, keys)
    if fig is None:
        return
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _totals(df: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """``metric`` summed over each run's rounds, per grid combination and platform."""
    rows = df[df["metric"] == metric]
    return rows.pivot_table(index=keys, columns="platform", values="value", aggfunc="sum")


def comparison_figure(df: pd.DataFrame, keys: list[str]) -> Any:
    """The grid's comparison (None without results): the final accuracy (else eval loss)
    per platform and combination; with bytes in the results, beside it each combination's
    uplink bytes per platform, labelled with the compression ratio (float32 ÷ actual) when
    the results record what float32 would have cost (issue 23); with simulated time in the
    results (a simulation's ``all``/``sim_seconds``), each combination's accuracy (else
    eval loss) of all platforms against simulated time: time to accuracy (issue 24)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xflwb.style import PLATFORM_COLORS  # the dashboard's colour per platform

    metric = "accuracy" if "accuracy" in set(df.get("metric", [])) else "eval_loss"
    sub = df[df["metric"] == metric]
    if sub.empty:
        return None
    last = sub[sub["round"] == sub.groupby("run")["round"].transform("max")]
    table = last.pivot_table(index=keys, columns="platform", values="value")
    up = _totals(df, keys, "bytes_up")
    timed = sim_curves(df, keys, metric)
    n = 1 + bool(len(up)) + bool(timed)
    fig, axes = plt.subplots(1, n, figsize=(7 + 4 * (n - 1), 3.5), squeeze=False)
    ax = axes[0][0]
    table.plot.bar(ax=ax, color=[PLATFORM_COLORS.get(str(c), "#888888") for c in table.columns])
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"final {metric} per platform")
    if len(up):
        ax = axes[0][1]
        up.plot.bar(ax=ax, color=[PLATFORM_COLORS.get(str(c), "#888888") for c in up.columns])
        ax.set_ylabel("uplink bytes (all rounds)")
        f32 = _totals(df, keys, "bytes_up_float32")
        if len(f32):
            ratio = (f32 / up.where(up > 0)).reindex_like(up)
            ax.set_title("uplink bytes per platform (× smaller than float32)")
            for container, plat in zip(ax.containers, up.columns, strict=True):
                ax.bar_label(container, labels=["" if pd.isna(r) else f"{r:.1f}×"
                                                for r in ratio[plat]], fontsize=8)
        else:
            ax.set_title("uplink bytes per platform")
    if timed:
        _sim_panel(axes[0][-1], timed, metric)
    fig.tight_layout()
    return fig


def sim_curves(df: pd.DataFrame, keys: list[str], metric: str
               ) -> dict[str, tuple[list[float], list[float]]]:
    """Per grid combination ("k=v, ..."): the simulated seconds at each round's end and
    ``metric`` of platform ``all`` at that round (rounds with both); empty when the results
    carry no simulated time (phone sessions, older simulations)."""
    if "sim_seconds" not in set(df.get("metric", [])):
        return {}
    rows = df[df["platform"] == "all"]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for combo, part in rows.groupby(keys, sort=False):
        values = combo if isinstance(combo, tuple) else (combo,)
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        wide = part.pivot_table(index=["run", "round"], columns="metric", values="value",
                                aggfunc="last")
        if "sim_seconds" not in wide.columns or metric not in wide.columns:
            continue
        both = wide[["sim_seconds", metric]].dropna()
        if len(both):
            out[label] = (both["sim_seconds"].tolist(), both[metric].tolist())
    return out


def _sim_panel(ax: Any, curves: dict[str, tuple[list[float], list[float]]],
               metric: str) -> None:
    """Each combination's ``metric`` against simulated time, in the unit that reads best."""
    from xflwb.style import sim_label, sim_unit

    longest = max(max(t) for t, _v in curves.values())
    scale = sim_unit(longest)[0]
    for label, (t, v) in curves.items():
        ax.plot([s / scale for s in t], v, marker=".", label=label)
    ax.set_xlabel(sim_label(longest))
    ax.set_ylabel(f"{metric} (all platforms)")
    ax.set_title(f"{metric} against simulated time")
    ax.legend(fontsize=8)
