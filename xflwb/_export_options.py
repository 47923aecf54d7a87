"""The export options, shared by ``xflwb export`` and ``%%xfl_export``.

They live below both front-ends (not in ``xflwb.cli``) so the magics do not import the
command line: front-ends share helpers from underneath, never from each other.
"""

from __future__ import annotations

import argparse
from typing import Any

from xflwb.errors import InputError


def add_export_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``xflwb export`` and ``%%xfl_export``."""
    p.add_argument("--data-type", default=None, help="data type phones ask for (default: name)")
    p.add_argument("--platforms", default="android,ios", help="comma list: android,ios")
    p.add_argument("--loss", default="categorical_crossentropy",
                   help="categorical_crossentropy (integer labels) or mse")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--learning-rate", type=float, default=None,
                   help="learning rate (default: 0.01 for sgd, 0.001 for adam)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", default="artifacts", help="artifact directory (default: "
                   "artifacts)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse the export if parity fails (--no-strict keeps it)")
    p.add_argument("--ios-training", default="auto", choices=["auto", "strict"],
                   help="auto: iOS freezes layers Core ML cannot update (Android trains "
                   "them); strict: refuse such models, naming each layer")
    add_verbose(p)


def add_verbose(p: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """``--verbose``: show TensorFlow's, absl's and the converter's log lines.

    Sub-commands default to SUPPRESS so that ``xflwb --verbose demo`` (the top-level flag)
    is not reset by the sub-command's default (argparse copies sub-parser defaults over).
    """
    if "--verbose" not in p._option_string_actions:
        p.add_argument("--verbose", action="store_true", default=default,
                       help="show TensorFlow's and the TFLite converter's log lines")


def export_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed export options as ``xflwb.export`` keywords."""
    from xflwb.bridge.optim import SGD, Adam

    opt: SGD | Adam
    if args.optimizer == "sgd":
        opt = SGD(learning_rate=0.01 if args.learning_rate is None else args.learning_rate,
                  momentum=args.momentum or 0.0)
    else:
        if args.momentum is not None:
            raise InputError("--momentum applies to --optimizer sgd only")
        opt = Adam(learning_rate=0.001 if args.learning_rate is None else args.learning_rate)
    return {"data_type": args.data_type, "platforms": args.platforms, "loss": args.loss,
            "optimizer": opt, "batch_size": args.batch_size, "epochs": args.epochs,
            "out_dir": args.out, "strict": args.strict,
            "ios_training": args.ios_training,
            # unset: XFLWB_VERBOSE decides (quiet by default)
            "verbose": True if getattr(args, "verbose", False) else None}
