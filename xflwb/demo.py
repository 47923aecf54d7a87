"""``make demo`` / ``xflwb demo``: export a digits CNN, show parity, train every runtime.

At this stage (bridge only) the demo exports the CNN, prints the parity report, and trains
the Keras reference, the Android artifact (TFLite interpreter) and the iOS artifact (numpy
Core ML executor) for a few local epochs from the same start on the same offline data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def demo_model(input_shape: tuple[int, ...] = (8, 8, 1), classes: int = 10) -> Any:
    """A small CNN for 8×8 digits: every layer trains on both platforms."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(classes, activation="softmax", name="probs"),
    ], name="digits_cnn")


def run(out: str | Path = "demo-output", epochs: int = 3, batch_size: int = 32,
        seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Run the demo; returns the export result and the training table."""
    import xflwb
    from xflwb.bridge import runtime
    from xflwb.devices import datasets

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else print
    data = datasets.load("digits", seed=seed)
    model = demo_model(data.input_shape, data.classes)
    res = xflwb.export(model, name="digits_cnn", data_type="digits",
                       out_dir=out / "artifacts",
                       optimizer=xflwb.SGD(learning_rate=0.05, momentum=0.9),
                       batch_size=batch_size, epochs=1)
    say(f"exported {res.name} v{res.version} in {res.seconds:.1f} s → {res.directory}")
    for plat, path in res.paths.items():
        say(f"  {plat:9s} {path.name} ({path.stat().st_size:,} bytes)")
    say("\nparity (Keras vs TFLite vs Core ML executor):")
    say(res.parity.drop(columns=["note"]).to_string(index=False))

    start = xflwb.bridge.params.canonical(model)
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
    say(f"\nlocal training, {epochs} epochs on {len(data.x_train)} digits, same start and "
        "batches:")
    say(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    table.to_csv(out / "runtimes.csv", index=False)
    res.parity.to_csv(out / "parity.csv", index=False)
    _plot(curves, out / "training_loss.png")
    say(f"\nwrote {out / 'runtimes.csv'}, {out / 'parity.csv'}, {out / 'training_loss.png'}")
    spread = float(np.ptp(table["test_accuracy"]))
    say(f"test-accuracy spread across runtimes: {spread:.4f}")
    return {"export": res, "table": table}


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for (name, losses), style in zip(curves.items(), ("-o", "--s", ":^"), strict=False):
        ax.plot(range(1, len(losses) + 1), losses, style, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.set_title("Same model, three runtimes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
