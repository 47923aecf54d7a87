"""Malformed updates sent / sessions broken (issue 12, "one client can only ever cost its
own update").

Two parts, both with one attacker among honest clients:

* **in process**: ``CrossPlatformStrategy.aggregate_fit`` with two honest android clients and
  one malformed FitRes per round, the FitRes parsed from protobuf bytes and decoded by
  Flower's serde (what the gRPC client proxy hands the strategy); random dtypes (structured,
  complex, ints, bools, strings, float128), wrong counts and shapes, NaN / inf / 1e30 /
  3e38, random bytes, num_examples anywhere in int64; for each of Flower's strategies we
  serve. Broken = an exception escaped ``aggregate_fit`` or the global model is not finite.
* **live**: sessions on loopback (a real session process, Flower's legacy gRPC transport)
  with two honest clients and an attacker on raw gRPC that answers each FitIns with a
  random malformed FitRes or a stream-level misbehaviour (the FitRes twice or three times,
  an EvaluateRes or empty message first, the wrong answer kind first, non-protobuf bytes).
  Broken = the session did not finish, or an honest client missed a round.

Run: ``.venv/bin/python benchmarks/robustness_fuzz.py`` (about a minute);
``--updates 200 --sessions 1 --rounds 10`` for a quick check; ``--smoke`` for a few seconds
(60 updates, one session of 3 rounds).
"""

from __future__ import annotations

import argparse
import io
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ["<f4", ">f4", "<f2", "<f8", "<c8", "<c16", "<i4", "<u1", "|b1", "<U3",
          [("a", "<f4"), ("b", "<f4")], "<f16"]
VALUES = [0.5, -2.0, 1e30, -1e30, float("nan"), float("inf"), 3e38, 1e300]


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def malformed_tensors(rng: np.random.Generator, shapes: list[tuple[int, ...]]) -> list[bytes]:
    """A random, probably malformed, list of wire tensors for a model of ``shapes``."""
    count = int(rng.choice([len(shapes), len(shapes), 0, len(shapes) - 1, len(shapes) + 1]))
    out = []
    for shape in (shapes * 2)[:count]:
        kind = rng.choice(["raw", "npy", "npy", "bytes", "npy_shape"])
        if kind == "bytes":
            out.append(rng.bytes(int(rng.integers(0, 64))))
            continue
        value = float(rng.choice(VALUES))
        if kind == "npy_shape":
            shape = tuple(int(d) for d in rng.integers(0, 6, int(rng.integers(0, 4))))
        if kind == "raw":
            with np.errstate(over="ignore"):
                out.append(np.full(shape, value, "<f4").tobytes())
            continue
        dtype = np.dtype(DTYPES[int(rng.integers(len(DTYPES)))])
        if dtype.fields is not None:
            out.append(npy(np.zeros(shape, dtype)))
            continue
        with np.errstate(all="ignore"):
            arr = (np.full(shape, value, np.float64).astype(dtype) if dtype.kind in "fc"
                   else np.ones(shape, dtype))
        out.append(npy(arr))
    return out


def random_examples(rng: np.random.Generator) -> int:
    """Mostly positive (so the tensors get checked too), sometimes anything in int64."""
    r = rng.random()
    if r < 0.4:
        return int(rng.choice([2**63 - 1, -(2**63), 0, 1, 10, 10**7]))
    if r < 0.8:
        return int(rng.integers(1, 2**63 - 1, dtype=np.int64))
    return int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64))


def fitres_bytes(tensors: list[bytes], n: int) -> bytes:
    from flwr.proto import transport_pb2 as pb

    return pb.ClientMessage(fit_res=pb.ClientMessage.FitRes(
        parameters=pb.Parameters(tensors=tensors, tensor_type="ND"),
        num_examples=n)).SerializeToString()


# -- in process ---------------------------------------------------------------------------------
def in_process(updates: int, seed: int) -> dict[str, Any]:
    from flwr.common import serde
    from flwr.proto import transport_pb2 as pb

    from xflwb.bridge import params
    from xflwb.flower_legacy import ClientProxy
    from xflwb.sessions.flower_strategy import CrossPlatformStrategy

    shapes = [(3, 3), (3,), (2, 7), (7,)]
    manifest = {"name": "m", "version": 1, "parameters": [
        {"name": f"p{i}", "shape": list(s)} for i, s in enumerate(shapes)],
        "platforms": {"android": {"trained": [0, 1, 2, 3]}}}

    class Phone(ClientProxy):
        def __init__(self, cid: str) -> None:
            super().__init__(cid)
            self.platform = "android"

        def get_properties(self, *a: Any) -> Any:
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    def decoded(raw: bytes) -> Any:
        return serde.fit_res_from_proto(pb.ClientMessage.FromString(raw).fit_res)

    import logging

    logging.getLogger("xflwb").setLevel(logging.ERROR)  # one warning per rejection otherwise
    rng = np.random.default_rng(seed)
    strategies = {"fedavg": {}, "fedmedian": {}, "fedtrimmedavg": {"beta": 0.2},
                  "krum": {"num_malicious_clients": 1}, "fedadam": {}}
    sent = broken = rejected = 0
    reasons: dict[str, int] = {}
    for i in range(updates):
        name = list(strategies)[i % len(strategies)]
        start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        honest = [[a + rng.normal(0, 0.1, a.shape).astype(np.float32) for a in start]
                  for _ in range(2)]
        reports: list = []
        s = CrossPlatformStrategy(manifest, start, strategy=name,
                                  strategy_options=strategies[name], min_clients=1,
                                  on_fit_round=lambda r, g, box=reports: box.append(r))
        results = [(Phone(f"h{k}"), decoded(fitres_bytes(params.encode_tensors(h), 10)))
                   for k, h in enumerate(honest)]
        results.append((Phone("bad"), decoded(fitres_bytes(
            malformed_tensors(rng, shapes), random_examples(rng)))))
        sent += 1
        try:
            s.aggregate_fit(1, results, [])
        except Exception as exc:
            broken += 1
            print(f"  broken ({name}): {type(exc).__name__}: {exc}")
            continue
        if not all(np.isfinite(g).all() for g in s.global_):
            broken += 1
            print(f"  broken ({name}): the global model is not finite")
        for _, cid, why in reports[0].rejections:
            if cid == "bad":
                rejected += 1
                key = why.split(":")[0] + ":" + why.split(":")[1][:28] if ":" in why else why
                reasons[key] = reasons.get(key, 0) + 1
    return {"sent": sent, "broken": broken, "rejected": rejected, "reasons": reasons}


# -- live ---------------------------------------------------------------------------------------
class StreamClient:
    """A client on the legacy stream, byte by byte: ``on_fit(received) -> messages``."""

    def __init__(self, port: int, shapes: list[tuple[int, ...]],
                 on_fit: Callable[[list[np.ndarray]], list[bytes]]) -> None:
        self.port, self.shapes, self.on_fit = port, shapes, on_fit
        self.rounds = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self._stream()
            time.sleep(0.1)

    def _stream(self) -> None:
        import grpc
        from flwr.proto import transport_pb2 as pb

        out: queue.Queue = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (m := out.get()) is not None:
                yield m

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            call = ch.stream_stream("/flwr.proto.FlowerService/Join",
                                    request_serializer=lambda b: b,
                                    response_deserializer=pb.ServerMessage.FromString)(
                requests())
            threading.Thread(target=lambda: (self.stop.wait(), call.cancel()),
                             daemon=True).start()
            try:
                for msg in call:
                    kind = msg.WhichOneof("msg")
                    if kind == "fit_ins":
                        got = [np.frombuffer(t, "<f4").copy()
                               for t in msg.fit_ins.parameters.tensors]
                        self.rounds += 1
                        for m in self.on_fit(got):
                            out.put(m)
                    elif kind == "evaluate_ins":
                        out.put(pb.ClientMessage(evaluate_res=pb.ClientMessage.EvaluateRes(
                            loss=0.5, num_examples=5)).SerializeToString())
                    elif kind == "get_parameters_ins":
                        out.put(pb.ClientMessage(get_parameters_res=pb.ClientMessage
                                                 .GetParametersRes(parameters=pb.Parameters(
                                                     tensors=[np.zeros(s, "<f4").tobytes()
                                                              for s in self.shapes],
                                                     tensor_type="ND"))).SerializeToString())
                    elif kind == "reconnect_ins":
                        self.stop.set()
                        break
            except grpc.RpcError:
                pass
            finally:
                out.put(None)


def live(sessions: int, rounds: int, seed: int, workdir: Path | None = None
         ) -> dict[str, Any]:
    import keras
    from flwr.proto import transport_pb2 as pb

    import xflwb

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    tmp = workdir or Path(tempfile.mkdtemp(prefix="xflwb-fuzz-"))
    res = xflwb.export(model, name="fuzz", data_type="fuzz-data", out_dir=tmp / "exports")
    shapes = [tuple(p["shape"]) for p in res.manifest["parameters"]]
    rng = np.random.default_rng(seed)

    def honest(got: list[np.ndarray]) -> list[bytes]:
        return [fitres_bytes([(g + 0.01).astype("<f4").tobytes() for g in got], 10)]

    empty = b""
    eval_res = pb.ClientMessage(evaluate_res=pb.ClientMessage.EvaluateRes(
        loss=0.5, num_examples=5)).SerializeToString()
    wrong = pb.ClientMessage(get_parameters_res=pb.ClientMessage.GetParametersRes()
                             ).SerializeToString()
    stream_actions: list[Callable[[list[np.ndarray]], list[bytes]]] = [
        lambda got: honest(got) * 2, lambda got: honest(got) * 3,
        lambda got: [eval_res, *honest(got)], lambda got: [empty, *honest(got)],
        lambda got: [wrong, *honest(got)], lambda got: [rng.bytes(40)]]
    counts = {"sent": 0}

    def attack(got: list[np.ndarray]) -> list[bytes]:
        counts["sent"] += 1
        if rng.random() < 0.6:
            return [fitres_bytes(malformed_tensors(rng, shapes), random_examples(rng))]
        return stream_actions[int(rng.integers(len(stream_actions)))](got)

    wb = xflwb.Workbench(data_dir=tmp / "xfl", port=0).start()
    broken = 0
    try:
        wb.publish(res)
        for k in range(sessions):
            s = wb.train("fuzz", rounds=rounds, min_clients=3, round_timeout=30)
            port = s.ports["android"]
            clients = [StreamClient(port, shapes, honest) for _ in range(2)]
            attacker = StreamClient(port, shapes, attack)
            try:
                status = s.wait(timeout=60 + 5 * rounds)
            except TimeoutError as exc:
                status = f"timed out: {exc}"
                s.stop()
            for c in (*clients, attacker):
                c.stop.set()
            ok = status == "finished" and all(c.rounds == rounds for c in clients)
            broken += not ok
            print(f"  session {k + 1}: {status}, honest rounds "
                  f"{[c.rounds for c in clients]}/{rounds}, "
                  f"{len(s.rejections)} rejections, {len(s.failures)} failed fits")
    finally:
        wb.stop()
    return {"sent": counts["sent"], "sessions": sessions, "broken": broken}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=2000, help="in-process malformed FitRes")
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path,
                    help="the export and the workbench's data go here (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true",
                    help="60 updates, one session of 3 rounds: checks the benchmark runs")
    a = ap.parse_args()
    if a.smoke:
        a.updates, a.sessions, a.rounds = 60, 1, 3
    t0 = time.perf_counter()
    ip = in_process(a.updates, a.seed)
    print(f"in process: {ip['sent']} malformed updates sent, {ip['rejected']} rejected, "
          f"{ip['broken']} rounds broken ({time.perf_counter() - t0:.1f} s)")
    for why, n in sorted(ip["reasons"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {n:5d}  {why}")
    t0 = time.perf_counter()
    lv = live(a.sessions, a.rounds, a.seed, a.workdir)
    print(f"live: {lv['sent']} malformed updates / stream misbehaviours sent over "
          f"{lv['sessions']} sessions, {lv['broken']} sessions broken "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
