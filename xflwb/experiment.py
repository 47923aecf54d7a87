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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if "accuracy" in set(df.get("metric", [])) else "eval_loss"
    sub = df[df["metric"] == metric]
    if sub.empty:
        return
    last = sub[sub["round"] == sub.groupby("run")["round"].transform("max")]
    table = last.pivot_table(index=keys, columns="platform", values="value")
    from xflwb.style import PLATFORM_COLORS  # the dashboard's colour per platform

    ax = table.plot.bar(figsize=(7, 3.5),
                        color=[PLATFORM_COLORS.get(str(c), "#888888") for c in table.columns])
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"final {metric} per platform")
    plt.tight_layout()
    plt.savefig(path, dpi=100)
    plt.close("all")
