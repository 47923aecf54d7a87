"""``make demo`` / ``xflwb demo``: the whole workflow on embedded defaults, offline.

Export a digits CNN for Android and iOS (parity table), start the bundled backend, publish,
run a 10-round Flower session with 2 Android + 2 iOS virtual devices (the real artifacts,
over the real protocol) on Dirichlet(0.5) partitions, then print per-platform results and
the global model's accuracy, and save a plot and the history. ``--local-only`` instead
trains the three runtimes side by side from one start (no server). ``--model activity``
runs either with a Conv1D on the generated ``activity`` accelerometer windows instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xflwb._console import format_table, wait
from xflwb._models import activity_model, demo_model
from xflwb.bridge.params import PLATFORMS
from xflwb.style import color, plot_figure, traffic_table

#: ``run_federated(model=...)`` / ``xflwb demo --model``: (builder, dataset = data type).
MODELS: dict[str, tuple[Any, str]] = {
    "digits_cnn": (demo_model, "digits"),
    "activity": (activity_model, "activity"),
}


def _pick(model: str) -> tuple[Any, str]:
    if model not in MODELS:
        raise ValueError(f"unknown demo model {model!r}; available: {sorted(MODELS)}")
    return MODELS[model]


def _export(model: str, out: Path, seed: int, batch_size: int,
            say: Any) -> tuple[str, Any, Any, Any]:
    """The demo model built for its dataset and exported into ``out/artifacts``: (dataset
    name, data, Keras model, ExportResult)."""
    import xflwb
    from xflwb.devices import datasets

    build, dataset = _pick(model)
    out.mkdir(parents=True, exist_ok=True)
    data = datasets.load(dataset, seed=seed)
    keras_model = build(data.input_shape, data.classes)
    res = xflwb.export(keras_model, name=keras_model.name, data_type=dataset,
                       out_dir=out / "artifacts",
                       optimizer=xflwb.SGD(learning_rate=0.05, momentum=0.9),
                       batch_size=batch_size, epochs=1)
    say(f"exported {res.name} v{res.version} in {res.seconds:.1f} s → {res.directory}")
    return dataset, data, keras_model, res


def run(out: str | Path = "demo-output", epochs: int = 3, batch_size: int = 32,
        seed: int = 0, quiet: bool = False, model: str = "digits_cnn") -> dict[str, Any]:
    """Run the demo; returns the export result and the training table.

    ``model`` picks the model and its dataset, as in `run_federated`.
    """
    import xflwb
    from xflwb.bridge import runtime

    out = Path(out)
    say = (lambda *a: None) if quiet else print
    dataset, data, keras_model, res = _export(model, out, seed, batch_size, say)
    for plat, path in res.paths.items():
        say(f"  {plat:9s} {path.name} ({path.stat().st_size:,} bytes)")
    say("\nparity (Keras vs TFLite vs Core ML executor):")
    say(res.parity.drop(columns=["note"]).to_string(index=False))

    start = xflwb.bridge.params.canonical(keras_model)
    rows = []
    curves = {}
    for name in ("keras", "android", "ios"):
        rt = runtime.load(res, name)
        rt.set_canonical_parameters(start)
        before = rt.evaluate(data.x_test, data.y_test)
        t0 = time.perf_counter()
        losses = rt.fit(data.x_train, data.y_train, epochs=epochs, batch_size=batch_size,
                        shuffle=True, seed=seed)
        secs = time.perf_counter() - t0
        loss, acc = rt.evaluate(data.x_test, data.y_test)
        curves[name] = losses
        rows.append({"runtime": name, "epochs": epochs, "train_loss_first": losses[0],
                     "train_loss_last": losses[-1], "test_loss": loss,
                     "test_accuracy_before": before[1], "test_accuracy": acc,
                     "seconds": secs})
    table = pd.DataFrame(rows)
    what = "digits" if dataset == "digits" else f"{dataset} samples"
    say(f"\nlocal training, {epochs} epochs on {len(data.x_train)} {what}, same start and "
        "batches:")
    say(format_table(table))
    table.to_csv(out / "runtimes.csv", index=False)
    res.parity.to_csv(out / "parity.csv", index=False)
    _plot(curves, out / "training_loss.png")
    say(f"\nwrote {out / 'runtimes.csv'}, {out / 'parity.csv'}, {out / 'training_loss.png'}")
    spread = float(np.ptp(table["test_accuracy"]))
    say(f"test-accuracy spread across runtimes: {spread:.4f}")
    return {"export": res, "table": table}


def run_federated(out: str | Path = "demo-output", rounds: int = 10, android: int = 2,
                  ios: int = 2, partition: str = "dirichlet:0.5", local_epochs: int = 2,
                  seed: int = 0, quiet: bool = False, timeout: float = 900.0,
                  model: str = "digits_cnn", progress: bool | None = None) -> dict[str, Any]:
    """Export → serve → virtual devices → train; returns export, session tables, accuracy.

    ``model`` picks the model and its dataset (`MODELS`): ``"digits_cnn"`` (default, the
    Conv2D on 8×8 digits) or ``"activity"`` (a Conv1D on (32, 3) accelerometer windows,
    dataset and data type ``"activity"``). ``progress`` (default: unless ``quiet``) shows a
    round progress bar on stderr while the session trains.
    """
    import xflwb
    from xflwb.bridge import runtime

    out = Path(out)
    say = (lambda *a: None) if quiet else print
    dataset, data, keras_model, res = _export(model, out, seed, 32, say)
    say(res.parity.drop(columns=["note"]).to_string(index=False))
    wb = xflwb.Workbench(data_dir=out / "xfl-data", port=0).start()
    fleet = None
    try:
        wb.publish(res)
        session = wb.train(res.name, rounds=rounds, min_clients=android + ios,
                           local_epochs=local_epochs, round_timeout=300)
        say(f"\nbackend {wb.url}: session {session.id}, gRPC ports {session.ports}")
        fleet = wb.spawn_devices(android=android, ios=ios, dataset=dataset,
                                 partition=partition, seed=seed)
        t0 = time.perf_counter()
        status = wait(session, rounds, timeout=timeout,
                      progress=not quiet if progress is None else progress)
        secs = time.perf_counter() - t0
        fleet.wait(timeout=60)
        devices = fleet.table
        history = session.history
        final = session.global_parameters()
    finally:
        if fleet is not None:
            fleet.stop()
        wb.stop()
    # the global model on every sample of the dataset, run by each platform's artifact
    x_all = np.concatenate([data.x_train, data.x_test])
    y_all = np.concatenate([data.y_train, data.y_test])
    accuracy = {}
    for plat in PLATFORMS:
        rt = runtime.load(res, plat)
        rt.set_canonical_parameters(final)
        accuracy[plat] = rt.evaluate(x_all, y_all)[1]
    wide = history.pivot_table(index=["round", "platform"], columns="metric", values="value")
    per_platform = wide.reset_index()
    say(f"\nsession {status} in {secs:.1f} s; devices:")
    failed = "error" in devices.columns and devices["error"].fillna("").astype(bool).any()
    say(format_table(devices if failed else devices.drop(columns=["error"], errors="ignore")))
    cols = [c for c in ("clients", "examples", "eval_loss", "accuracy", "rejected")
            if c in per_platform.columns]
    last = per_platform[per_platform["round"] == per_platform["round"].max()]
    say("\nper platform, last round:")
    say(format_table(last[["round", "platform", *cols]]))
    traffic = traffic_table(history)
    if not traffic.empty:  # what each platform sent and received (and, compressed, the ratio)
        say("\nbytes on the wire (totals):")
        say(format_table(traffic))
    both_every_round = bool(
        (wide.xs("android", level="platform")["clients"] > 0).all()
        and (wide.xs("ios", level="platform")["clients"] > 0).all())
    what = "digits" if dataset == "digits" else f"{dataset} samples"
    say(f"\nglobal model accuracy on all {len(x_all)} {what}: "
        f"{accuracy['android']:.4f} (TFLite), {accuracy['ios']:.4f} (Core ML executor); "
        f"both platforms contributed every round: {both_every_round}")
    history.to_csv(out / "history.csv", index=False)
    devices.to_csv(out / "devices.csv", index=False)
    _save(plot_figure(history, title=f"{keras_model.name}: {android} Android + {ios} iOS "
                      f"virtual phones, {dataset} ({partition})"), out / "federated.png")
    say(f"wrote {out / 'history.csv'}, {out / 'devices.csv'}, {out / 'federated.png'}")
    return {"export": res, "status": status, "history": history, "devices": devices,
            "accuracy": accuracy, "both_every_round": both_every_round, "seconds": secs}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for (name, losses), style in zip(curves.items(), ("-o", "--s", ":^"), strict=False):
        ax.plot(range(1, len(losses) + 1), losses, style, label=name, color=color(name))
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Same model, three runtimes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
