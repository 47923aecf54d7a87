"""One client can only ever cost its own update (issue 12, items 1 and 2).

In process: ``aggregate_fit`` fed real FitRes objects decoded from protobuf bytes (what
Flower's client proxy hands the strategy), fuzzed with hypothesis. Live: a session process
on loopback with two honest FedKit-style phones (tests/wirephone.py) and one attacker that
speaks the legacy gRPC stream byte by byte (duplicates, out-of-order messages, garbage).
"""

from __future__ import annotations

import io
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import keras
import numpy as np
import pytest
from flwr.common import serde
from flwr.proto import transport_pb2 as pb
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import xflwb
from tests.conftest import SERVED_TOY_MANIFEST as MANIFEST
from tests.wirephone import WirePhone
from xflwb.bridge import params
from xflwb.federation.aggregate import aggregate_masked, aggregate_robust
from xflwb.flower_legacy import ClientProxy
from xflwb.sessions.flower_strategy import CrossPlatformStrategy
from xflwb.sessions.status import DONE

SHAPES = [tuple(p["shape"]) for p in MANIFEST["parameters"]]
ANDROID = [True] * len(SHAPES)
IOS = params.trained_mask(MANIFEST, "ios")  # index 3 (dense/bias) is frozen on iOS


class Phone(ClientProxy):
    """A connected client as the strategy sees it: an id and the platform of its port."""

    def __init__(self, cid: str, platform: str = "android") -> None:
        super().__init__(cid)
        self.platform = platform

    def get_properties(self, *a):  # pragma: no cover - never called
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_header_only(descr: str, shape: tuple[int, ...], payload: bytes) -> bytes:
    """A .npy file with any header (object dtypes cannot be saved without pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + payload


def wire_fitres(tensors: list[bytes], num_examples: int) -> Any:
    """A FitRes as the server gets it: protobuf bytes off the wire, parsed, then Flower's
    serde (exactly what ``GrpcClientProxy.fit`` returns)."""
    raw = pb.ClientMessage(fit_res=pb.ClientMessage.FitRes(
        parameters=pb.Parameters(tensors=tensors, tensor_type="ND"),
        num_examples=num_examples)).SerializeToString()
    return serde.fit_res_from_proto(pb.ClientMessage.FromString(raw).fit_res)


def canon(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def run_round(bad: Any, strategy: str = "fedavg", options: dict | None = None,
              **kwargs: Any) -> tuple[CrossPlatformStrategy, Any, list, list]:
    """Round 1 with two honest android clients (10 examples each) and ``bad``."""
    start, h1, h2 = canon(0), canon(1), canon(2)
    reports: list = []
    s = CrossPlatformStrategy(MANIFEST, start, strategy=strategy, strategy_options=options,
                              min_clients=1, on_fit_round=lambda r, g: reports.append(r),
                              **kwargs)
    results = [(Phone("h1"), wire_fitres(params.encode_tensors(h1), 10)),
               (Phone("h2"), wire_fitres(params.encode_tensors(h2), 10)),
               (Phone("bad"), bad)]
    s.aggregate_fit(1, results, [])
    return s, reports[0], [h1, h2], start


def honest_only(honest: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [(a + b) / 2 for a, b in zip(*honest, strict=True)]


def assert_close(got: list[np.ndarray], want: list[np.ndarray], tol: float = 1e-5) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


# -- (b) the probe table's rows, in process ------------------------------------------------------
def test_structured_dtype_is_refused_by_name_and_round_goes_on():
    rec = np.zeros(14, [("a", "<f4"), ("b", "<f4")])
    tensors = [npy(a) for a in canon(3)]
    tensors[2] = npy(rec)  # dense/kernel has 14 elements: the count is right, the type is not
    s, report, honest, _ = run_round(wire_fitres(tensors, 10))
    (_, cid, why), = report.rejections
    assert cid == "bad" and "structured dtype" in why and "('a', '<f4')" in why
    assert_close(s.global_, honest_only(honest))


def test_complex_dtype_is_refused_not_truncated():
    tensors = [npy(a.astype(np.complex64) + 1j) for a in canon(3)]
    s, report, honest, _ = run_round(wire_fitres(tensors, 10))
    (_, cid, why), = report.rejections
    assert cid == "bad" and "complex64" in why
    assert_close(s.global_, honest_only(honest))


@pytest.mark.parametrize("dtype", ["<i4", "|b1", "<U2", "<f16", "<i8"])
def test_other_dtypes_are_refused_by_name(dtype):
    tensors = [npy(np.ones(s, dtype)) for s in SHAPES]
    s, report, honest, _ = run_round(wire_fitres(tensors, 10))
    (_, _, why), = report.rejections
    assert np.dtype(dtype).name in why
    assert_close(s.global_, honest_only(honest))


def test_object_dtype_header_is_refused():
    tensors = [npy_header_only("|O", s, b"\0" * 8 * int(np.prod(s))) for s in SHAPES]
    s, report, honest, _ = run_round(wire_fitres(tensors, 10))
    (_, _, why), = report.rejections
    assert "object" in why
    assert_close(s.global_, honest_only(honest))


def test_values_of_1e30_are_rejected_beyond_max_update_norm():
    huge = [np.full(s, 1e30, np.float32) for s in SHAPES]
    s, report, honest, _ = run_round(wire_fitres(params.encode_tensors(huge), 10),
                                     max_update_norm=100.0)
    (_, cid, why), = report.rejections
    assert cid == "bad" and "exceeds max_update_norm 100" in why and "not clipped" in why
    assert_close(s.global_, honest_only(honest))


def test_values_of_1e30_barely_move_the_median():
    huge = [np.full(s, 1e30, np.float32) for s in SHAPES]
    s, report, honest, _ = run_round(wire_fitres(params.encode_tensors(huge), 10),
                                     strategy="fedmedian")
    assert report.rejections == []
    # the median of (h1, h2, 1e30) is the larger honest value: bounded by the honest updates
    for g, a, b in zip(s.global_, *honest, strict=True):
        np.testing.assert_array_equal(g, np.maximum(a, b))
    assert max(float(np.abs(g).max()) for g in s.global_) < 10


def test_num_examples_2_63_is_capped_and_recorded():
    bad = canon(3)
    s, report, honest, _ = run_round(wire_fitres(params.encode_tensors(bad), 2**63 - 1),
                                     max_examples=30, max_weight_ratio=None)
    assert report.rejections == []
    want = [(10 * a + 10 * b + 30 * c) / 50 for a, b, c in zip(*honest, bad, strict=True)]
    assert_close(s.global_, want)
    metrics = {(p, k): v for p, k, v in report.metrics}
    assert metrics[("android", "capped")] == 1 and metrics[("android", "examples")] == 50


def test_default_cap_is_twice_the_rounds_median_claim():
    # max_weight_ratio=2 by default (issue 20): 2 × the median 10, not max_examples' 10**6
    _, report, _, _ = run_round(wire_fitres(params.encode_tensors(canon(3)), 2**63 - 1))
    metrics = {(p, k): v for p, k, v in report.metrics}
    assert metrics[("android", "capped")] == 1
    assert metrics[("android", "examples")] == 20 + 20


def test_any_exception_in_one_update_is_its_rejection():
    """An exception class the strategy never names (TypeError from a FitRes whose
    parameters are not Parameters) still costs only that update."""
    odd = wire_fitres([], 10)
    odd.parameters = None
    s, report, honest, _ = run_round(odd)
    (_, cid, why), = report.rejections
    assert cid == "bad" and why.startswith(("TypeError", "AttributeError"))
    assert_close(s.global_, honest_only(honest))


def test_evaluate_res_with_bad_numbers_costs_only_its_report():
    from xflwb.flower_legacy import Code, EvaluateRes, Status

    reports: list = []
    s = CrossPlatformStrategy(MANIFEST, canon(0), on_evaluate_round=reports.append)
    ok = EvaluateRes(Status(Code.OK, ""), loss=0.5, num_examples=10, metrics={})
    bad = [EvaluateRes(Status(Code.OK, ""), loss=float("nan"), num_examples=2**63 - 1,
                       metrics={"accuracy": 1e300}),
           EvaluateRes(Status(Code.OK, ""), loss=1.0, num_examples=-4, metrics={})]
    loss, _ = s.aggregate_evaluate(1, [(Phone("g"), ok), (Phone("x"), bad[0]),
                                       (Phone("y"), bad[1])], [])
    assert loss == pytest.approx(0.5)
    assert [cid for _, cid, _ in reports[0].rejections] == ["y"]
    assert ("all", "accuracy") not in {(p, k) for p, k, _ in reports[0].metrics}


# -- (c) robust rules in canonical space, with the mask -----------------------------------------
def _fill(value: float) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


def test_median_and_trimmed_mean_by_hand_with_the_mask():
    """Android clients train everything, iOS clients all but parameter 3. Parameter 3's
    median is over the android values only; the others over all five."""
    prev = _fill(0.0)
    updates = [(_fill(v), 10, ANDROID) for v in (1.0, 2.0, 100.0)]
    updates += [(_fill(v), 10, IOS) for v in (3.0, -50.0)]
    med = aggregate_robust(prev, updates, "fedmedian")
    for g in med:  # all five: -50, 1, 2, 3, 100 → 2; parameter 3, android's: 1, 2, 100 → 2
        np.testing.assert_array_equal(g, 2.0)
    updates[0] = (_fill(4.0), 10, ANDROID)  # 4, 2, 100 | 3, -50
    med = aggregate_robust(prev, updates, "fedmedian")
    for k, g in enumerate(med):
        np.testing.assert_array_equal(g, 4.0 if k == 3 else 3.0)
    # beta 0.2 cuts int(0.2·5) = 1 value at each end of five, int(0.2·3) = 0 of three
    trim = aggregate_robust(prev, updates, "fedtrimmedavg", beta=0.2)
    for k, g in enumerate(trim):
        want = (4 + 2 + 100) / 3 if k == 3 else (2 + 3 + 4) / 3
        np.testing.assert_allclose(g, want, rtol=1e-6)
    # a tensor nobody trained keeps its value
    only_ios = aggregate_robust(_fill(7.0), [(_fill(1.0), 5, IOS)], "fedmedian")
    np.testing.assert_array_equal(only_ios[3], 7.0)
    np.testing.assert_array_equal(only_ios[0], 1.0)


def test_krum_picks_an_honest_update_per_group():
    prev = _fill(0.0)
    updates = [(_fill(v), 10, ANDROID) for v in (1.0, 1.1, 0.9, 1.05)]
    updates.append((_fill(1e6), 10, ANDROID))
    out = aggregate_robust(prev, updates, "krum", num_malicious_clients=1)
    for g in out:
        assert 0.9 <= float(g.flat[0]) <= 1.1
    multi = aggregate_robust(prev, updates, "krum", num_malicious_clients=1,
                             num_clients_to_keep=3)
    for g in multi:
        assert 0.9 <= float(g.flat[0]) <= 1.1


def test_one_attacker_barely_moves_the_median_in_a_round():
    """Five honest clients near 1, one sends 1e6: the median stays within the honest
    spread, FedAvg is dragged ~1.7e5 away unless its norm bound (on by default) rejects it."""
    start = _fill(0.0)
    rng = np.random.default_rng(0)
    honest = [[np.float32(1) + rng.normal(0, 0.01, s).astype(np.float32) for s in SHAPES]
              for _ in range(5)]
    results = [(Phone(f"h{i}"), wire_fitres(params.encode_tensors(h), 10))
               for i, h in enumerate(honest)]
    results.append((Phone("bad"), wire_fitres(params.encode_tensors(_fill(1e6)), 10)))
    for name, bound, ratio in (("fedmedian", 0.05, 4.0), ("fedtrimmedavg", 0.05, 4.0),
                               ("fedavg", 0.05, 4.0), ("fedavg", None, None)):
        s = CrossPlatformStrategy(MANIFEST, start, strategy=name, min_clients=1,
                                  strategy_options={"beta": 0.2} if name == "fedtrimmedavg"
                                  else None, max_norm_ratio=ratio)
        s.aggregate_fit(1, results, [])
        moved = max(float(np.abs(g - 1).max()) for g in s.global_)
        if bound is None:
            assert moved > 1e5
        else:
            assert moved < bound


# -- (a) the fuzz, in process: random and malformed FitRes ---------------------------------------
DTYPES = ["<f4", ">f4", "<f2", "<f8", "<c8", "<c16", "<i4", "<u1", "|b1", "<U3",
          [("a", "<f4"), ("b", "<f4")], "<f16"]


@st.composite
def tensor_blob(draw: st.DrawFn, shape: tuple[int, ...]) -> bytes:
    kind = draw(st.sampled_from(["raw", "npy", "npy", "bytes", "npy_shape"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    value = draw(st.sampled_from([0.5, -2.0, 1e30, -1e30, float("nan"), float("inf"),
                                  3e38, 1e300]))
    if kind == "npy_shape":
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    if kind == "raw":
        with np.errstate(over="ignore"):
            return np.full(shape, value, "<f4").tobytes()
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if dtype.fields is not None:
        return npy(np.zeros(shape, dtype))
    with np.errstate(all="ignore"):
        arr = np.full(shape, value, np.float64).astype(dtype) if dtype.kind in "fc" else (
            np.ones(shape, dtype))
    return npy(arr)


@st.composite
def malformed_fitres(draw: st.DrawFn) -> tuple[list[bytes], int]:
    count = draw(st.sampled_from([len(SHAPES), len(SHAPES), 0, len(SHAPES) - 1,
                                  len(SHAPES) + 1]))
    shapes = (SHAPES * 2)[:count]
    tensors = [draw(tensor_blob(s)) for s in shapes]
    n = draw(st.one_of(st.sampled_from([2**63 - 1, -(2**63), 0, 1, 10, 10**7]),
                       st.integers(1, 2**63 - 1), st.integers(-(2**63), 2**63 - 1)))
    return tensors, n


def _decode_independently(tensors: list[bytes]) -> list[np.ndarray]:
    out = []
    for t, s in zip(tensors, SHAPES, strict=True):
        a = (np.load(io.BytesIO(t), allow_pickle=False) if t[:6] == b"\x93NUMPY"
             else np.frombuffer(t, "<f4"))
        out.append(np.asarray(a, np.float32).reshape(s))
    return out


@settings(max_examples=25, deadline=None)
@given(bad=malformed_fitres(), strategy=st.sampled_from(["fedavg", "fedmedian", "fedadam"]))
def test_fuzz_one_malformed_fitres_costs_only_its_update(bad, strategy):
    tensors, n = bad
    s, report, honest, start = run_round(wire_fitres(tensors, n), strategy=strategy)
    assert all(np.isfinite(g).all() for g in s.global_)
    rejected = [cid for _, cid, _ in report.rejections]
    assert set(rejected) <= {"bad"}
    if strategy != "fedavg":
        return
    if rejected:
        assert_close(s.global_, honest_only(honest))
    else:  # a well-formed update after all: weighted in, at most 2 × the median claim 10
        mine = _decode_independently(tensors)
        want = aggregate_masked(start, [(honest[0], 10, None), (honest[1], 10, None),
                                        (mine, min(n, 20), None)])
        assert_close(s.global_, want, tol=1e-4)


# -- live: a session process, two honest phones and an attacker on the wire ----------------------
def _dense(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return xflwb.export(_dense(), name="tough", data_type="tough-data",
                        out_dir=tmp_path_factory.mktemp("tough"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory, export):
    wb = xflwb.Workbench(data_dir=tmp_path_factory.mktemp("xfl"), port=0,
                         admin_token="secret").start()
    wb.publish(export)
    yield wb
    wb.stop()


Reply = list[bytes]  # serialized ClientMessages (or garbage) to send for one FitIns


def fitres_bytes(arrays: list[np.ndarray], n: int, codec: str = "raw") -> bytes:
    tensors = ([np.ascontiguousarray(a, "<f4").tobytes() for a in arrays] if codec == "raw"
               else [npy(a) for a in arrays])
    return pb.ClientMessage(fit_res=pb.ClientMessage.FitRes(
        parameters=pb.Parameters(tensors=tensors, tensor_type="ND"),
        num_examples=n)).SerializeToString()


EVAL_RES = pb.ClientMessage(evaluate_res=pb.ClientMessage.EvaluateRes(
    loss=0.5, num_examples=5)).SerializeToString()


class Attacker:
    """A client on the legacy stream that answers each FitIns with ``plan[round]``: a list
    of raw messages (possibly none, several, or not protobuf at all). It reconnects when the
    server drops its stream, until ``stop``. ``sent[round]`` holds the update it meant."""

    def __init__(self, port: int, plan: list[Callable[[list[np.ndarray]], Reply]],
                 shapes: list[tuple[int, ...]]) -> None:
        self.port, self.plan, self.shapes = port, plan, shapes
        self.rounds = 0
        self.streams = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Attacker:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.streams += 1
            self._stream()
            time.sleep(0.1)

    def _stream(self) -> None:
        out: queue.Queue = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (m := out.get()) is not None:
                yield m

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            join = ch.stream_stream("/flwr.proto.FlowerService/Join",
                                    request_serializer=lambda b: b,
                                    response_deserializer=pb.ServerMessage.FromString)
            call = join(requests())
            threading.Thread(target=lambda: (self._stop.wait(), call.cancel()),
                             daemon=True).start()
            try:
                for msg in call:
                    kind = msg.WhichOneof("msg")
                    if kind == "fit_ins":
                        got = [np.frombuffer(t, "<f4").copy()
                               for t in msg.fit_ins.parameters.tensors]
                        step = self.plan[min(self.rounds, len(self.plan) - 1)]
                        self.rounds += 1
                        for m in step(got):
                            out.put(m)
                    elif kind == "evaluate_ins":
                        out.put(EVAL_RES)
                    elif kind == "get_parameters_ins":  # as a FedKit Android phone answers
                        out.put(pb.ClientMessage(get_parameters_res=pb.ClientMessage
                                                 .GetParametersRes(parameters=pb.Parameters(
                                                     tensors=[np.zeros(sh, "<f4").tobytes()
                                                              for sh in self.shapes],
                                                     tensor_type="ND"))).SerializeToString())
                    elif kind == "reconnect_ins":
                        self._stop.set()
                        break
            except grpc.RpcError:
                pass
            finally:
                out.put(None)


def honest_step(seed: int, n: int = 10) -> Callable[[list[np.ndarray]], Reply]:
    def step(got: list[np.ndarray]) -> Reply:
        rng = np.random.default_rng(seed)
        return [fitres_bytes([g + rng.normal(0, 0.1, g.shape).astype(np.float32)
                              for g in got], n)]
    return step


def delta(seed: int):
    rng = np.random.default_rng(seed)
    return lambda ts, _r: [t + rng.normal(0, 0.1, t.shape).astype(np.float32) for t in ts]


def run_live(bench: Any, export: Any, plan: list, **options: Any) -> dict[str, Any]:
    """A session of ``len(plan)`` rounds: two honest android phones, the attacker on the
    android port following ``plan``; the final round of the plan is honest."""
    options.setdefault("round_timeout", 60)
    s = bench.train("tough", rounds=len(plan), min_clients=3, **options)
    phones = [WirePhone(bench.url, "android", "tough-data", delta(i), num_examples=10,
                        device_id=100 + i, send_telemetry=False) for i in (1, 2)]
    threads = [p.start() for p in phones]
    shapes = [tuple(p["shape"]) for p in export.manifest["parameters"]]
    attacker = Attacker(s.ports["android"], plan, shapes).start()
    try:
        status = s.wait(timeout=120)
    finally:
        if s.status not in DONE:  # a failed assertion must not block the next session
            s.stop()
        attacker.stop()
        for t in threads:
            t.join(30)
    return {"session": s, "status": status, "phones": phones, "attacker": attacker}


def _final_expected(live: dict[str, Any], export: Any, attacker_sent: list[np.ndarray] | None):
    shapes = [tuple(p["shape"]) for p in export.manifest["parameters"]]
    ups = [[np.asarray(t).reshape(sh) for t, sh in zip(p.report.sent[-1], shapes, strict=True)]
           for p in live["phones"]]
    if attacker_sent is not None:
        ups.append([np.asarray(t).reshape(sh) for t, sh in zip(attacker_sent, shapes,
                                                              strict=True)])
    return [sum(u[k] for u in ups) / len(ups) for k in range(len(shapes))]


def recording(step: Callable[[list[np.ndarray]], Reply], box: list):
    """Wrap an honest step, keeping the update it sent (decoded from its own bytes)."""
    def inner(got: list[np.ndarray]) -> Reply:
        msgs = step(got)
        fit = pb.ClientMessage.FromString(msgs[0]).fit_res
        box.append([np.frombuffer(t, "<f4") for t in fit.parameters.tensors])
        return msgs
    return inner


@pytest.mark.timeout(300)
def test_live_probe_rows_cost_only_the_attackers_updates(bench, export):
    """The probe table's rows against a live session: structured and complex tensors,
    1e30 values, num_examples 2^63 − 1, and a duplicated FitRes; the honest phones finish
    every round and the global model is the honest aggregate (plus the attacker's own
    well-formed last update)."""
    shapes = [tuple(p["shape"]) for p in export.manifest["parameters"]]

    def as_npy(make):
        return lambda got: [pb.ClientMessage(fit_res=pb.ClientMessage.FitRes(
            parameters=pb.Parameters(tensors=[npy(make(sh)) for sh in shapes],
                                     tensor_type="ndarray"),
            num_examples=10)).SerializeToString()]

    last: list = []
    plan = [
        as_npy(lambda sh: np.zeros(sh, [("a", "<f4"), ("b", "<f4")])),  # structured
        as_npy(lambda sh: np.ones(sh, np.complex64)),  # complex
        lambda got: [fitres_bytes([np.full(g.shape, 1e30, np.float32) for g in got], 10)],
        lambda got: [fitres_bytes(got, 2**63 - 1)],  # capped to max_examples
        lambda got: honest_step(7)(got) * 2,  # the same FitRes twice
        recording(honest_step(8), last),
    ]
    live = run_live(bench, export, plan, max_examples=10, max_update_norm=1e3)
    s = live["session"]
    assert live["status"] == "finished", s.error
    for p in live["phones"]:
        assert p.report.error is None, p.report.error
        assert p.report.rounds_fit == len(plan)
    rej = s.rejections
    reasons = dict(zip(rej["round"], rej["reason"], strict=False))
    assert "structured dtype" in reasons[1] and "complex64" in reasons[2]
    assert "max_update_norm" in reasons[3]
    # read off the wire the moment it arrives: a duplicate, or (had the server already
    # sent the EvaluateIns) out of order; either way dropped, never an answer
    assert any(re.match(r"(duplicated|out-of-order) FitRes", r) for r in rej["reason"])
    assert not any("got 0" in r for r in rej["reason"])  # the stream never desynced
    h = s.history
    capped = h[(h.metric == "capped") & (h.platform == "android")]
    assert list(capped["round"]) == [4]
    final = s.global_parameters()
    assert all(np.isfinite(g).all() for g in final)
    assert_close(final, _final_expected(live, export, last[0]), tol=1e-5)


STREAM_ACTIONS = {
    "duplicate": lambda got: honest_step(5)(got) * 2,
    "three_times": lambda got: honest_step(5)(got) * 3,
    "flood": lambda got: honest_step(5)(got) * 20,  # 19 violations: disconnected at 16
    "evaluate_res_first": lambda got: [EVAL_RES, *honest_step(5)(got)],
    "empty_message": lambda got: [b"", *honest_step(5)(got)],
    "garbage_bytes": lambda got: [b"\xff\x00garbage\x13\x37" * 8],
    "wrong_kind_first": lambda got: [pb.ClientMessage(
        get_parameters_res=pb.ClientMessage.GetParametersRes()).SerializeToString(),
        *honest_step(5)(got)],
}


@pytest.mark.timeout(600)
@settings(max_examples=2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(st.sampled_from(sorted(STREAM_ACTIONS)), min_size=2, max_size=2))
@example(actions=["garbage_bytes", "duplicate"])  # always: a stream that dies, then a dup
@example(actions=["flood", "evaluate_res_first"])  # always: cut off, comes back
def test_live_fuzz_stream_level_misbehaviour(bench, export, actions):
    """Duplicates, answers to nothing, the wrong kind, empty and non-protobuf messages on
    the stream: the honest phones finish every round and the global model stays the
    aggregate of what the session accepted."""
    last: list = []
    plan = [STREAM_ACTIONS[a] for a in actions] + [recording(honest_step(9), last)]
    live = run_live(bench, export, plan, round_timeout=20)
    s = live["session"]
    assert live["status"] == "finished", s.error
    for p in live["phones"]:
        assert p.report.error is None, p.report.error
        assert p.report.rounds_fit == len(plan)
    final = s.global_parameters()
    assert all(np.isfinite(g).all() for g in final)
    h = s.history
    clients = h[(h.metric == "clients") & (h.platform == "all")].set_index("round")["value"]
    accepted_attacker = clients[len(plan)] == 3
    assert_close(final, _final_expected(live, export, last[-1] if accepted_attacker else None))
