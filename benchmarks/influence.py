"""How far one attacker moves the model, against one honest phone (issue 20, item 3).

    python benchmarks/influence.py            # 10 rounds / versions, 9 honest phones
    python benchmarks/influence.py --smoke    # 3 rounds / versions, 4 honest phones

In process, on the real aggregation path: ``CrossPlatformStrategy.aggregate_fit`` for
synchronous rounds (fedavg) and FedBuff's ``AsyncLoop`` arrival step with its
``VersionBuffer`` (fedbuff, K = honest phones + 1, every update trained on the current
version), fed real FitRes bytes (protobuf, parsed by Flower's serde). Honest phones hold
8–12 examples and send a random step of 0.01 per element; one attacker claims
``num_examples=10**15`` and sends, per attack:

* ``item3``: a step 100× an honest one (the probe of issue 20);
* ``claim``: a step as large as an honest one (only the claim lies);
* ``adaptive``: a step just under the default norm bound (0.95 × max_norm_ratio × the
  honest norm) — an attacker that knows the defaults.

Each round / version, the model's move along the attacker's own direction is compared
with what one honest update moves the model in a round without the attacker (its weight
share times its step, averaged over the honest phones): the **ratio** is how many honest
updates the attacker is worth (goal ≤ 1 for the attack of item 3); **pull** is the
fraction of the attacker's step that reached the model (the issue measured 0.71–1.0 per
version). Settings: ``old`` = what the defaults were (max_examples=10**6, no relative
bounds, no norm bound), ``default`` = today's defaults. Results go to stdout; record them in
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.common import serde
from flwr.proto import transport_pb2 as pb

from xflwb.bridge import params
from xflwb.federation.influence import DEFAULT_MAX_NORM_RATIO
from xflwb.flower_legacy import ClientProxy
from xflwb.server.fedbuff import AsyncLoop, FedBuff, _Job
from xflwb.sessions.flower_strategy import CrossPlatformStrategy

SHAPES = [(256, 64), (64,)]  # a 16k-parameter dense layer: big enough for directions
MANIFEST: dict[str, Any] = {
    "name": "influence", "version": 1,
    "parameters": [{"name": f"p{i}", "shape": list(s)} for i, s in enumerate(SHAPES)],
    "platforms": {"android": {"tflite_layers": [4 * int(np.prod(s)) for s in SHAPES],
                              "file": "f", "sha256": "0", "bytes": 1}},
}
SETTINGS = {
    "old": {"max_examples": 1_000_000, "max_weight_ratio": None, "max_norm_ratio": None},
    "default": {},
}
HONEST_SCALE = 0.01


class Phone(ClientProxy):
    """A connected phone as the strategy sees it (id, platform, timing, bytes)."""

    seconds = 0.0
    bytes_up = bytes_down = 0

    def __init__(self, cid: str) -> None:
        super().__init__(cid)
        self.platform = "android"

    def get_properties(self, *a: Any) -> Any:  # pragma: no cover - never called
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def fitres(model: list[np.ndarray], n: int) -> Any:
    """The FitRes a phone sends: protobuf bytes off the wire, parsed by Flower's serde."""
    raw = pb.ClientMessage(fit_res=pb.ClientMessage.FitRes(
        parameters=pb.Parameters(tensors=params.encode_tensors(model), tensor_type="ND"),
        num_examples=n)).SerializeToString()
    return serde.fit_res_from_proto(pb.ClientMessage.FromString(raw).fit_res)


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])


def unflat(v: np.ndarray) -> list[np.ndarray]:
    out, i = [], 0
    for s in SHAPES:
        n = int(np.prod(s))
        out.append(v[i:i + n].reshape(s).astype(np.float32))
        i += n
    return out


def deltas(rng: np.random.Generator, honest: int, attack: str
           ) -> tuple[list[np.ndarray], np.ndarray]:
    """This round's honest steps and the attacker's."""
    size = sum(int(np.prod(s)) for s in SHAPES)
    steps = [HONEST_SCALE * rng.standard_normal(size) for _ in range(honest)]
    norm = float(np.median([np.linalg.norm(d) for d in steps]))
    direction = rng.standard_normal(size)
    direction /= np.linalg.norm(direction)
    length = {"item3": 100 * norm, "claim": norm,
              "adaptive": 0.95 * DEFAULT_MAX_NORM_RATIO * norm}[attack]
    return steps, length * direction


def one(strategy_name: str, attack: str, setting: str, honest: int, rounds: int,
        seed: int = 0) -> tuple[list[float], list[float], int]:
    """Per round / version: (ratios, pulls), and how many attacker updates were rejected."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(8, 13, honest)
    start = unflat(rng.standard_normal(sum(int(np.prod(s)) for s in SHAPES)) * 0.1)
    s = CrossPlatformStrategy(MANIFEST, start, min_clients=2, **SETTINGS[setting])
    loop = None
    arrivals: list[Any] = []
    if strategy_name == "fedbuff":
        loop = AsyncLoop(None, s, FedBuff(buffer_size=honest + 1, evaluate_every=0),
                         max_versions=10**6, max_workers=1, on_arrival=arrivals.append)
    ratios, pulls = [], []
    rejected = 0
    reports: list[Any] = []
    s.on_fit_round = lambda r, g: reports.append(r)
    for _ in range(rounds):
        before = flat(s.global_)
        steps, evil = deltas(rng, honest, attack)
        updates = [(f"h{i}", unflat(before + d), int(n))
                   for i, (d, n) in enumerate(zip(steps, counts, strict=True))]
        updates.insert(len(updates) // 2, ("attacker", unflat(before + evil), 10**15))
        if loop is None:
            s.aggregate_fit(len(reports) + 1, [(Phone(c), fitres(m, n)) for c, m, n in updates],
                            [])
            rejected += sum(cid == "attacker" for _, cid, _ in reports[-1].rejections)
        else:
            version = loop.state.version
            for cid, model, n in updates:
                fut: Future[Any] = Future()
                fut.set_result(fitres(model, n))
                loop._complete(fut, _Job("fit", Phone(cid), "android", loop.state.version))
            while loop.state.version == version:  # the attacker was rejected: one more
                fut = Future()
                fut.set_result(fitres(unflat(before + steps[0]), int(counts[0])))
                loop._complete(fut, _Job("fit", Phone("h0"), "android", version))
            rejected += sum(a.client == "attacker" and a.status == "rejected"
                            for a in arrivals)
            arrivals.clear()
        moved = flat(s.global_) - before
        toward_attacker = float(moved @ evil / np.linalg.norm(evil))
        one_honest = statistics.mean(n / counts.sum() * float(np.linalg.norm(d))
                                     for d, n in zip(steps, counts, strict=True))
        ratios.append(toward_attacker / one_honest)
        pulls.append(toward_attacker / float(np.linalg.norm(evil)))
    return ratios, pulls, rejected


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="3 rounds, 4 honest phones")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # every capped or rejected update logs a line
    honest, rounds = (4, 3) if args.smoke else (9, 10)
    print(f"{honest} honest phones (8-12 examples, step {HONEST_SCALE}/element), one attacker "
          f"claiming 10**15 examples; {rounds} rounds / versions")
    print(f"{'strategy':8} {'attack':9} {'setting':8} {'ratio med':>10} {'ratio max':>10} "
          f"{'pull med':>9} {'rejected':>9}")
    for strategy_name in ("fedavg", "fedbuff"):
        for attack in ("item3", "claim", "adaptive"):
            for setting in SETTINGS:
                ratios, pulls, rejected = one(strategy_name, attack, setting, honest, rounds)
                print(f"{strategy_name:8} {attack:9} {setting:8} "
                      f"{statistics.median(ratios):10.3g} {max(ratios):10.3g} "
                      f"{statistics.median(pulls):9.3g} {rejected:>5}/{rounds}")


if __name__ == "__main__":
    main()
