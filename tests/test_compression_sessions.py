"""Compression in sessions (issue 23): the server side and the reference phone.

Core level, with fakes (no processes): the gate decodes every codec against the model the
client received (a lossy down-link included), refuses a codec it did not ask for and any
corrupt or oversized payload with its reason (hypothesis: costing only that client), a
round negotiates per client (FedKit / stock Flower clients declare nothing and keep
float32), FedBuff's delta base is the version the phone started from, and central DP
clips after decoding even when a codec inflates norms. End to end: real virtual devices
(TFLite, Core ML executor) over real gRPC, Android sending int8 and iOS float32 in one
round."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SERVED_TOY_MANIFEST as MANIFEST
from tests.conftest import Phone, toy_canonical
from tests.support import wait_until
from xflwb.bridge import params
from xflwb.bridge.arrays import Array
from xflwb.errors import InputError, UpdateRejected
from xflwb.federation import codecs
from xflwb.federation.codecs import (
    KEY_CODEC,
    KEY_UP,
    Codec,
    ErrorFeedback,
    announce,
    codec_from_tensor_type,
    encode_arrays,
    parse,
)
from xflwb.federation.gate import MalformedUpdate, UpdateGate
from xflwb.federation.rounds import Evaluation, Failure, FitJob, FitResult, Round, Target
from xflwb.flower_legacy import Code, FitRes, Parameters, Status

PLATFORMS = ("android", "ios")
INT8_UP = {"up": "int8", "down": "float32"}


def gate() -> UpdateGate:
    g = UpdateGate(MANIFEST)
    g.check_manifest(toy_canonical(0))
    return g


def shapes(platform: str) -> list[tuple[int, ...]]:
    return params.platform_shapes(MANIFEST, platform)


def elements(platform: str) -> int:
    return sum(math.prod(s) for s in shapes(platform))


def receive(tensors: list[bytes], tensor_type: str, platform: str) -> list[Array]:
    """What a phone decodes from a model it was sent (written from the wire format: the
    tensor_type names the down-link codec, else raw / .npy)."""
    down = codec_from_tensor_type(tensor_type)
    if down is None:
        return [a.reshape(s) for a, s in zip(params.decode_tensors(tensors)[0],
                                             shapes(platform), strict=True)]
    return [down.decode(b, math.prod(s)).reshape(s)
            for b, s in zip(tensors, shapes(platform), strict=True)]


def send(model: list[Array], received: list[Array], up: Codec | None, native: str = "raw",
         seed: int = 0) -> tuple[list[bytes], dict[str, Any]]:
    """A phone's answer: its model (platform layout) in ``up`` (a delta codec: through error
    feedback against what it received) or float32 in its own encoding."""
    if up is None:
        return params.encode_tensors(model, native), {}
    rng = np.random.default_rng(seed)
    if up.delta:
        delta = [np.subtract(m, r, dtype=np.float32) for m, r in zip(model, received,
                                                                      strict=True)]
        return ErrorFeedback().encode(delta, up, rng), {KEY_CODEC: up.spec}
    return encode_arrays(model, up, rng=rng), {KEY_CODEC: up.spec}


def nudged(model: list[Array], scale: float, seed: int = 5) -> list[Array]:
    rng = np.random.default_rng(seed)
    return [(a + scale * rng.standard_normal(a.shape)).astype(np.float32) for a in model]


# -- the gate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("down", [None, "fp16", "int8"])
@pytest.mark.parametrize("up", ["fp16", "int8", "int8:block=16", "topk:0.25", "rotate+int8"])
def test_the_gate_decodes_each_codec_within_its_bound(up, down, platform):
    base = toy_canonical(0)
    g = gate()
    up_codec, down_codec = parse(up, "up"), parse(down, "down") if down else None
    sent = g.encode(base, platform, down_codec or "raw")
    received = receive(sent, codecs.tensor_type(down_codec) if down_codec else "ND",
                       platform)
    trained = nudged(received, 0.01)
    blobs, metrics = send(trained, received, up_codec)
    u = g.accept(platform, "c", blobs, 7, metrics, base, up=up_codec, down=down_codec)
    assert u.compression == up_codec.spec and u.examples == 7
    assert u.float32_bytes == 4 * elements(platform)
    got = params.to_platform(u.tensors, MANIFEST, platform)
    exact = params.to_platform(base, MANIFEST, platform)
    for g_, t, r, e in zip(got, trained, received, exact, strict=True):
        ref = np.subtract(t, r) if up_codec.delta else t
        want = e + (t - r)  # the client's change, applied to the exact base
        assert float(np.linalg.norm(g_ - want)) <= up_codec.bound(ref) * 1.001 + 1e-5
    assert u.trained == params.trained_mask(MANIFEST, platform)


@pytest.mark.parametrize("up", ["int8", "topk:1", None])
def test_the_change_is_applied_to_the_exact_base_so_down_link_rounding_never_accumulates(up):
    """int8 down (coarse blocks) moves what the phone holds by far more than its tiny
    update. The update is the phone's change to what it received, applied to the exact
    global model: adding the received model instead would put the down-link's rounding
    into the global model every round (a random walk swamping small updates), and
    subtracting the global model instead of the received one would count that rounding as
    the phone's change. Holds for delta codecs and for an absolute float32 update (fp16's
    own rounding is as large as the down-link's: the bound test covers it)."""
    base = toy_canonical(0)
    g = gate()
    down, up_codec = parse("int8:block=64", "down"), parse(up, "up") if up else None
    received = receive(g.encode(base, "android", down), codecs.tensor_type(down), "android")
    lossy = max(float(np.abs(r - b).max()) for r, b in
                zip(received, params.to_platform(base, MANIFEST, "android"), strict=True))
    trained = nudged(received, 1e-4)
    blobs, metrics = send(trained, received, up_codec)
    u = g.accept("android", "a", blobs, 3, metrics, base, up=up_codec, down=down)
    change = [np.subtract(t, r) for t, r in zip(trained, received, strict=True)]
    want = [e + c for e, c in zip(params.to_platform(base, MANIFEST, "android"), change,
                                  strict=True)]
    got = params.to_platform(u.tensors, MANIFEST, "android")
    err = max(float(np.abs(a - w).max()) for a, w in zip(got, want, strict=True))
    assert lossy > 1e-3 > 100 * err  # the server reproduced the received model exactly
    assert g.received(base, "android", down) is g.received(base, "android", down)  # cached


def test_the_codec_must_be_the_one_asked_for_and_float32_is_always_accepted():
    base = toy_canonical(0)
    g = gate()
    int8, fp16 = parse("int8"), parse("fp16")
    model = params.to_platform(nudged(base, 0.01), MANIFEST, "android")
    received = params.to_platform(base, MANIFEST, "android")
    blobs, metrics = send(model, received, fp16)
    with pytest.raises(MalformedUpdate, match=r"codec 'fp16'.*asked this client for 'int8'"):
        g.accept("android", "a", blobs, 3, metrics, base, up=int8)
    blobs, metrics = send(model, received, int8)
    with pytest.raises(MalformedUpdate, match=r"codec 'int8'.*asked this client for "
                                              "'float32'"):
        g.accept("android", "a", blobs, 3, metrics, base)  # asked nothing
    with pytest.raises(MalformedUpdate, match="codec 7"):
        g.accept("android", "a", blobs, 3, {KEY_CODEC: 7}, base, up=int8)
    plain = params.encode_tensors(model, "npy")  # asked int8, answered float32: fine
    u = g.accept("android", "a", plain, 3, {}, base, up=int8)
    assert (u.compression, u.codec) == ("float32", "npy")


def test_corrupt_or_oversized_payloads_are_rejected_with_the_reason():
    base = toy_canonical(0)
    g = gate()
    int8 = parse("int8")
    received = params.to_platform(base, MANIFEST, "android")
    blobs, metrics = send(nudged(received, 0.01), received, int8)
    fp16_blobs, _ = send(nudged(received, 0.01), received, parse("fp16"))
    cases = {
        "extra bytes": ([blobs[0] + b"\0" * 1000, *blobs[1:]], "tensor 0: int8: .* payload "
                                                               "bytes, expected"),
        "truncated": ([blobs[0][:-1], *blobs[1:]], "tensor 0: int8: .* payload bytes"),
        "another codec's bytes": (fp16_blobs, r"codec id 1, not 'int8' \(id 2\)"),
        "raw float32": (params.encode_tensors(received), "no xflwb codec header"),
        "tensor count": (blobs[:-1], "4 tensors, the platform's layout has 5"),
        "more elements": ([int8.encode(np.zeros(999, np.float32)), *blobs[1:]],
                          "declares 999 elements, the platform's layout has"),
    }
    for what, (payload, words) in cases.items():
        with pytest.raises(MalformedUpdate, match=words):
            g.accept("android", "a", payload, 3, metrics, base, up=int8)
        assert what  # each case named, so a failure says which


@st.composite
def mutated(draw: st.DrawFn) -> tuple[list[bytes], str]:
    """A valid compressed update of some codec with its bytes damaged: flipped, cut,
    extended, swapped between tensors."""
    spec = draw(st.sampled_from(["fp16", "int8", "topk:0.3", "rotate+int8"]))
    codec = parse(spec)
    received = params.to_platform(toy_canonical(0), MANIFEST, "android")
    blobs, _ = send(nudged(received, 0.05, draw(st.integers(0, 3))), received, codec)
    k = draw(st.integers(0, len(blobs) - 1))
    blob = bytearray(blobs[k])
    kind = draw(st.sampled_from(["flip", "cut", "extend", "swap", "header"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] = draw(st.integers(0, 255))
    elif kind == "cut":
        del blob[draw(st.integers(0, len(blob) - 1)):]
    elif kind == "extend":
        blob += draw(st.binary(min_size=1, max_size=64))
    elif kind == "swap":
        blob = bytearray(blobs[(k + 1) % len(blobs)])
    else:
        i = draw(st.integers(0, 11))
        blob[i] = draw(st.integers(0, 255))
    blobs[k] = bytes(blob)
    return blobs, spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=mutated())
def test_fuzz_a_damaged_compressed_payload_costs_only_its_client(payload):
    blobs, spec = payload
    codec = parse(spec)
    rnd = Round.build(MANIFEST, toy_canonical(0), min_clients=1, compression={"up": spec},
                      max_weight_ratio=None, max_norm_ratio=None)
    good = params.to_platform(nudged(toy_canonical(0), 0.01), MANIFEST, "android")
    received = params.to_platform(toy_canonical(0), MANIFEST, "android")
    good_blobs, metrics = send(good, received, codec)
    for cid in ("good", "bad"):
        rnd.downlink(cid, "android", "raw", {codec.name}, fit=True)
    try:
        u = rnd.gate.accept("android", "bad", blobs, 3, dict(metrics), toy_canonical(0),
                            up=codec)
    except UpdateRejected:
        pass
    else:  # bytes that still decode: a finite full model
        assert all(np.isfinite(a).all() for a in u.tensors)
    report = rnd.aggregate_fit(1, [FitResult("android", "good", good_blobs, 3, dict(metrics)),
                                   FitResult("android", "bad", blobs, 3, dict(metrics))], [])
    counted = {(p, k): v for p, k, v in report.metrics}
    assert counted[("android", "clients")] + counted[("android", "rejected")] == 2
    assert counted[("android", "clients")] >= 1  # the good one always counts
    assert all(np.isfinite(a).all() for a in rnd.global_)


# -- a round: negotiation per client -----------------------------------------------------------
@dataclass
class Client:
    platform: str
    declared: frozenset[str] | None  # None: says nothing (the host's probe found nothing)
    native: str = "raw"
    scale: float = 0.01
    tamper: Callable[[list[bytes]], list[bytes]] | None = None


@dataclass
class Source:
    """A ``ClientSource`` of phones that decode what they are sent by its tensor_type and
    answer in the codec the config asks for (``KEY_UP``), else float32."""

    clients: dict[str, Client]
    jobs: list[FitJob] = field(default_factory=list)
    received: dict[str, list[Array]] = field(default_factory=dict)

    def available(self) -> int:
        return len(self.clients)

    def sample(self, n: int) -> list[Target]:
        return [Target(cid, c.platform, c.native, c.declared)
                for cid, c in list(self.clients.items())[:n]]

    def fit(self, round: int, jobs: list[FitJob]) -> tuple[list[FitResult], list[Failure]]:
        out = []
        for job in jobs:
            self.jobs.append(job)
            cid = job.target.client
            c = self.clients[cid]
            received = receive(job.tensors, job.tensor_type, c.platform)
            self.received[cid] = received
            up = parse(job.config[KEY_UP], "up") if KEY_UP in job.config else None
            model = nudged(received, c.scale, round)
            if "clipping_norm" in job.config:  # central DP: clip, then encode (the device's)
                model, _ = params.clip_platform_update(model, received, MANIFEST, c.platform,
                                                       job.config["clipping_norm"])
            blobs, metrics = send(model, received, up, c.native)
            if c.tamper is not None:
                blobs = c.tamper(blobs)
            out.append(FitResult(c.platform, cid, blobs, 10, metrics,
                                 bytes_up=sum(len(b) for b in blobs),
                                 bytes_down=sum(len(b) for b in job.tensors)))
        return out, []

    def evaluate(self, round: int, jobs: list[FitJob]
                 ) -> tuple[list[Evaluation], list[Failure]]:
        return [], []


def test_a_round_negotiates_per_client_and_accounts_float32_bytes():
    everything = frozenset(codecs.CODECS)
    reports: list[Any] = []
    rnd = Round.build(MANIFEST, toy_canonical(0), min_clients=1, fraction_evaluate=0.0,
                      compression={"up": "int8", "down": "fp16"}, max_weight_ratio=None,
                      max_norm_ratio=None, on_fit_round=lambda r, g: reports.append(r))
    source = Source({
        "droid": Client("android", everything),
        "fp16-only": Client("android", frozenset({"fp16"})),  # down fp16, up float32
        "fedkit": Client("ios", frozenset()),  # "ND": declares nothing
        "stock": Client("ios", None, native="npy"),  # a stock Flower client
        "broken": Client("android", everything, tamper=lambda b: [b[0][:-3], *b[1:]]),
    })
    rnd.run(1, source)
    by = {j.target.client: j for j in source.jobs}
    assert by["droid"].config == {"local_epochs": 1, KEY_UP: "int8"}
    assert by["droid"].tensor_type == "xfl:fp16" == by["fp16-only"].tensor_type
    assert by["fp16-only"].config == by["fedkit"].config == by["stock"].config == {
        "local_epochs": 1}
    assert (by["fedkit"].tensor_type, by["stock"].tensor_type) == ("ND", "ndarray")
    report = reports[0]
    assert [(cid, why.split(":")[0]) for _, cid, why in report.rejections] == [
        ("broken", "MalformedUpdate")]
    m = {(p, k): v for p, k, v in report.metrics}
    assert m[("android", "clients")] == 2 and m[("ios", "clients")] == 2
    assert m[("android", "bytes_up_float32")] == 3 * 4 * elements("android")
    assert m[("ios", "bytes_down_float32")] == 2 * 4 * elements("ios")
    assert m[("all", "bytes_up_float32")] == (m[("android", "bytes_up_float32")]
                                              + m[("ios", "bytes_up_float32")])
    # the stock client's .npy is remembered; a compressed update does not change it
    assert rnd.codec_of == {"fp16-only": "raw", "fedkit": "raw", "stock": "npy"}
    # FedKit and stock Flower clients got exactly float32 (nothing lost on the way down)
    for cid in ("fedkit", "stock"):
        for a, b in zip(source.received[cid], params.to_platform(toy_canonical(0), MANIFEST,
                                                                  "ios"), strict=True):
            np.testing.assert_array_equal(a, b)


def test_simulations_take_every_client_as_capable_and_secagg_refuses_compression():
    rnd = Round.build(MANIFEST, toy_canonical(0), compression=INT8_UP,
                      capable_by_default=True)
    assert rnd.negotiate(None).up == parse("int8")
    assert rnd.negotiate(frozenset()).up is None  # declared nothing: float32
    phones = Round.build(MANIFEST, toy_canonical(0), compression=INT8_UP)
    assert phones.negotiate(None).up is None  # a phone that said nothing is never assumed
    with pytest.raises(InputError, match="SecAgg\\+ masks quantised vectors already"):
        Round.build(MANIFEST, toy_canonical(0), compression=INT8_UP, secure_sums=True)


def test_the_probe_reads_declared_codecs_and_stock_clients_declare_none():
    from flwr.common import GetParametersRes

    from xflwb.flower_legacy import SimpleClientManager
    from xflwb.server.clients import PlatformClientManager

    answers = {"capable": announce("ND", ["int8", "fp16", "future-codec"]),
               "fedkit": "ND", "flower": "numpy.ndarray"}
    shared = SimpleClientManager()
    cm = PlatformClientManager(shared, "android", probe_timeout=5)
    for cid, tensor_type in answers.items():
        phone = Phone(cid, "android")
        tensors = [params.encode_npy(np.zeros(2))] if cid == "flower" else []
        phone.get_parameters = (lambda ins, timeout, group_id, tt=tensor_type, t=tensors:
                                GetParametersRes(Status(Code.OK, ""), Parameters(t, tt)))
        cm.register(phone)
    wait_until(lambda: len(shared.all()) == 3, 30, "three probed phones registered")
    got = {cid: (c.codec, c.codecs) for cid, c in shared.all().items()}
    assert got == {"capable": ("raw", frozenset({"int8", "fp16"})),
                   "fedkit": ("raw", frozenset()), "flower": ("npy", frozenset())}


# -- FedBuff: the delta base is the version the phone started from ------------------------------
def test_fedbuff_decodes_a_stale_delta_against_the_version_it_started_from():
    """K=1: a fast phone makes version 1 while a slow one trains on version 0 (int8 down and
    up); the slow update is a delta to version 0 as it received it, applied to version 1
    with its staleness weight."""
    from xflwb.federation.fedbuff import Arrival, FedBuff
    from xflwb.flower_legacy import SimpleClientManager
    from xflwb.server.fedbuff import AsyncLoop
    from xflwb.sessions.flower_strategy import CrossPlatformStrategy

    start = toy_canonical(0)
    strategy = CrossPlatformStrategy(MANIFEST, start, min_clients=2, fraction_evaluate=0.0,
                                     max_weight_ratio=None, max_norm_ratio=None,
                                     compression={"up": "int8", "down": "int8"})
    v1_made, slow_back = threading.Event(), threading.Event()
    seen: dict[str, list[Any]] = {"fast": [], "slow": []}
    trained: dict[str, list[Array]] = {}
    got: dict[str, list[Array]] = {}  # what each phone received first

    def fit(cid: str, ins: Any) -> FitRes:
        seen[cid].append(ins)
        if cid == "slow":
            assert v1_made.wait(30)
        elif len(seen["fast"]) > 1:  # its second fit: back only after the slow one
            assert slow_back.wait(30)
        received = receive(list(ins.parameters.tensors), ins.parameters.tensor_type,
                           "android")
        model = nudged(received, 0.05, seed=len(seen[cid]) + (7 if cid == "slow" else 0))
        trained.setdefault(cid, model)
        got.setdefault(cid, received)
        blobs, metrics = send(model, received, parse(ins.config[KEY_UP], "up"))
        return FitRes(Status(Code.OK, ""), Parameters(blobs, "xfl:int8"), 10, metrics)

    cm = SimpleClientManager()
    for cid in ("fast", "slow"):
        phone = Phone(cid, "android")
        phone.codecs = frozenset(codecs.CODECS)
        phone.fit = lambda ins, timeout, group_id, c=cid: fit(c, ins)
        phone.reconnect = lambda *a: None
        cm.register(phone)
    arrivals: list[Arrival] = []

    def arrived(a: Arrival) -> None:
        arrivals.append(a)
        (v1_made if a.client == "fast" else slow_back).set()

    versions: list[list[Array]] = [[a.copy() for a in start]]
    strategy.on_fit_round = lambda report, model: versions.append([a.copy() for a in model])
    loop = AsyncLoop(cm, strategy, FedBuff(buffer_size=1, staleness="polynomial:0.5"),
                     max_versions=2, round_timeout=30, on_arrival=arrived)
    loop.run()
    slow = next(a for a in arrivals if a.client == "slow")
    assert (slow.status, slow.base_version, slow.staleness) == ("applied", 0, 1), slow
    assert slow.bytes_up_float32 == slow.bytes_down_float32 == 4 * elements("android")
    assert seen["slow"][0].config[KEY_UP] == "int8"
    assert seen["slow"][0].parameters.tensor_type == "xfl:int8"
    v0, v1, v2 = versions[0], versions[1], versions[2]
    w = 1 / math.sqrt(2)  # polynomial:0.5 at staleness 1
    off = []
    for k in range(len(v0)):  # the phone's change to the version it started from
        np.testing.assert_allclose(v2[k], v1[k] + w * (trained["slow"][k] - got["slow"][k]),
                                   atol=2e-3)
        wrong = v1[k] + w * (trained["slow"][k] - v1[k])  # against the newest version
        off.append(float(np.abs(v2[k] - wrong).max()))
    assert max(off) > 1e-2


# -- central DP: the server clips after decoding -----------------------------------------------
class Inflate(Codec):
    """Test-only: a delta codec whose decoder multiplies by 100 (a broken or hostile codec
    that inflates norms after the client clipped)."""

    name: ClassVar[str] = "inflate"
    ident: ClassVar[int] = 250
    delta: ClassVar[bool] = True
    directions: ClassVar[tuple[str, ...]] = ("up",)

    def _encode(self, flat: Array, rng: np.random.Generator | None) -> bytes:
        return flat.astype("<f4").tobytes()

    def _decode(self, body: memoryview, count: int) -> Array:
        out: Array = np.frombuffer(body, "<f4", count=count).astype(np.float32) * 100
        return out

    def bound(self, array: Any) -> float:
        return 99 * float(np.linalg.norm(array))


def test_central_dp_clips_after_decoding_so_an_inflating_codec_keeps_the_bound(monkeypatch):
    monkeypatch.setitem(codecs.CODECS, "inflate", Inflate)
    clip = 0.5
    base = toy_canonical(0)
    rnd = Round.build(MANIFEST, base, min_clients=1, fraction_evaluate=0.0,
                      compression={"up": "inflate"},
                      privacy={"noise_multiplier": 0.0, "clipping_norm": clip})
    source = Source({f"p{i}": Client("android", frozenset({"inflate"}), scale=1.0)
                     for i in range(3)})
    rnd.run(1, source)
    assert all(j.config[KEY_UP] == "inflate" and j.config["clipping_norm"] == clip
               for j in source.jobs)
    # each phone clipped its delta to C before encoding (as the device does) ...
    received = params.to_platform(base, MANIFEST, "android")
    model = nudged(received, 1.0)
    clipped, _ = params.clip_platform_update(model, received, MANIFEST, "android", clip)
    blobs, metrics = send(clipped, received, Inflate())
    decoded = rnd.gate.accept("android", "p0", blobs, 1, metrics, base, up=Inflate())
    mask = [True] * len(base)
    assert params.update_norm(decoded.tensors, base, mask) > 40 * clip  # ... it inflated
    # the sum's sensitivity bound holds: the mean of updates clipped to C moves ≤ C
    assert params.update_norm(rnd.global_, base, mask) <= clip * (1 + 1e-5)
    assert params.update_norm(rnd.global_, base, mask) > clip / 10


def test_device_codecs_option_is_checked():
    from xflwb.devices.device import DeviceOptions, declared_codecs

    assert declared_codecs("all") == tuple(codecs.CODECS)
    assert declared_codecs("none") == declared_codecs("") == ()
    assert declared_codecs("int8, fp16,int8") == ("int8", "fp16")
    with pytest.raises(InputError, match="did you mean 'int8'"):
        DeviceOptions(codecs="int9")


# -- end to end: real virtual devices over real gRPC --------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import xflwb
    from tests.conftest import digits_cnn

    return xflwb.export(digits_cnn(4), name="compressed_cnn", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("exp"))


def _int8_bytes(sizes: list[int]) -> int:
    """One update's wire bytes in int8 (block 256): header, a float32 scale per block, a
    byte per value, per tensor."""
    return sum(12 + 4 * -(-n // 256) + n for n in sizes)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_android_sends_int8_and_ios_float32_in_one_round_and_stock_phones_still_train(
        exported, tmp_path):
    """Compression up=int8, down=fp16; two Android phones declaring every codec, an iOS
    phone declaring nothing in raw float32 (FedKit-style) and one in .npy (stock Flower
    style): every phone trains both rounds, nothing is rejected, and the history's bytes
    per platform are int8's and fp16's exact sizes for Android, float32 for iOS."""
    import xflwb
    from xflwb.federation.compression import Compression

    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(exported)
        session = wb.train("compressed_cnn", rounds=2, min_clients=4, round_timeout=120,
                           compression=Compression(up="int8", down="fp16"))
        fleet = wb.spawn_devices(android=2, ios=2, dataset="digits", partition="iid", seed=0,
                                 codecs=["all", "all", "none", "none"],
                                 encoding=["raw", "raw", "raw", "npy"])
        assert session.wait(timeout=400) == "finished"
        table = fleet.wait(timeout=60)
        hist = session.history
    assert list(table.status) == ["finished"] * 4, table
    assert list(table.rounds_done) == [2] * 4
    wide = hist.pivot_table(index=["round", "platform"], columns="metric", values="value")
    droid, ios = wide.xs("android", level="platform"), wide.xs("ios", level="platform")
    assert (droid["clients"] == 2).all() and (ios["clients"] == 2).all()
    assert (droid["rejected"] == 0).all() and (ios["rejected"] == 0).all()
    sizes = {p: [math.prod(s) for s in params.platform_shapes(exported.manifest, p)]
             for p in PLATFORMS}
    f32 = {p: 4 * sum(sizes[p]) for p in PLATFORMS}
    assert (droid["bytes_up"] == 2 * _int8_bytes(sizes["android"])).all()
    assert (droid["bytes_down"] == 2 * sum(12 + 2 * n for n in sizes["android"])).all()
    assert (droid["bytes_up_float32"] == 2 * f32["android"]).all()
    assert (droid["bytes_up_float32"] / droid["bytes_up"] > 3).all()  # int8's saving
    # iOS: raw float32 (exactly the reference) plus .npy (the same and its headers)
    assert (ios["bytes_up_float32"] == 2 * f32["ios"]).all()
    assert (ios["bytes_up"] > ios["bytes_up_float32"]).all()
    assert (ios["bytes_up"] < 1.2 * ios["bytes_up_float32"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_virtual_phone_is_the_reference_client_of_every_direction(exported, platform):
    """The device's own answers, on its real runtime (TFLite / Core ML executor): it
    declares its codecs, decodes an fp16 model, answers top-k with error feedback kept
    across rounds, and the gate accepts what it sent; declaring none, it answers float32."""
    from xflwb.bridge import runtime
    from xflwb.bridge.manifest import initial_parameters
    from xflwb.devices import datasets
    from xflwb.devices.device import Device, DeviceOptions
    from xflwb.flower_legacy import transport_pb2 as pb

    d = datasets.load("digits")
    manifest = exported.manifest
    start = [np.asarray(a, np.float32) for a in initial_parameters(manifest)]
    g = UpdateGate(manifest)
    g.check_manifest(start)
    fp16, topk = parse("fp16", "down"), parse("topk:0.1", "up")

    def phone(declared: str) -> Device:
        dev = Device("http://127.0.0.1:1", platform, "digits", d.x_train[:64], d.y_train[:64],
                     d.x_test[:32], d.y_test[:32], options=DeviceOptions(codecs=declared))
        dev.runtime, dev.manifest = runtime.load(manifest, platform), dict(manifest)
        dev.status.session_id = 1
        return dev

    def fit_ins(config: dict[str, Any]) -> Any:
        return pb.ServerMessage(fit_ins=pb.ServerMessage.FitIns(
            parameters=pb.Parameters(tensors=g.encode(start, platform, fp16),
                                     tensor_type=codecs.tensor_type(fp16)),
            config={"local_epochs": pb.Scalar(sint64=1), **config}))

    dev = phone("all")
    probe = dev._answer(pb, "get_parameters_ins", pb.ServerMessage())
    assert codecs.capabilities(probe.get_parameters_res.parameters.tensor_type) == set(
        codecs.CODECS)
    residuals = []
    for _ in range(2):
        res = dev._answer(pb, "fit_ins", fit_ins({KEY_UP: pb.Scalar(string="topk:0.1")}))
        assert res.fit_res.metrics[KEY_CODEC].string == "topk:0.1"
        u = g.accept(platform, "d", list(res.fit_res.parameters.tensors), 64,
                     {KEY_CODEC: "topk:0.1"}, start, up=topk, down=fp16)
        assert u.compression == "topk:0.1" and all(np.isfinite(a).all() for a in u.tensors)
        residuals.append(dev._feedback[1])
    # what top-k kept back is carried to the next round of the session
    assert residuals[0] is residuals[1]
    assert any(float(np.abs(r).max()) > 0 for r in residuals[1].residual)
    ev = dev._answer(pb, "evaluate_ins", pb.ServerMessage(evaluate_ins=pb.ServerMessage.
                     EvaluateIns(parameters=fit_ins({}).fit_ins.parameters)))
    assert np.isfinite(ev.evaluate_res.loss)
    stock = phone("none")
    probe = stock._answer(pb, "get_parameters_ins", pb.ServerMessage())
    assert probe.get_parameters_res.parameters.tensor_type == "ND"
    res = stock._answer(pb, "fit_ins", fit_ins({KEY_UP: pb.Scalar(string="int8")}))
    assert KEY_CODEC not in res.fit_res.metrics
    assert g.accept(platform, "s", list(res.fit_res.parameters.tensors), 64, {}, start,
                    up=parse("int8")).compression == "float32"
