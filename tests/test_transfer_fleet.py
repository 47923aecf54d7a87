"""Transfer learning across platforms: a frozen MobileNetV2 backbone, a small adapter that only
Android can train, a head both platforms train.

One export serves every test (it is the expensive part). The plan it makes is checked first;
then a mixed fleet of device processes, a wire-level phone sending an update computed on
another backbone, and Flower's Simulation Engine run that same export unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest

import xflwb
from tests.conftest import transfer_model
from tests.wirephone import WirePhone
from xflwb.bridge import graph, params, runtime
from xflwb.bridge.manifest import initial_parameters
from xflwb.devices.partition import device_data

NAME, DATA = "transfer", "digits32"
ADAPTER = ("adapter", "adapter_bn")  # trained on Android, frozen on iOS
HEAD = "head"  # trained on both
SEED = 0


@pytest.fixture(scope="module")
def export(transfer_export):
    return transfer_export[1]


def _indices(manifest, layers):
    return [i for i, p in enumerate(manifest["parameters"]) if p["layer"] in layers]


def _elements(manifest, indices):
    return sum(int(np.prod(manifest["parameters"][i]["shape"])) for i in indices)


# -- the plan ---------------------------------------------------------------------------------
def test_plan_freezes_backbone_everywhere_and_adapter_on_ios(export):
    m = export.manifest
    table = export.layers.set_index("layer")
    backbone = table[table.index.str.startswith("mobilenetv2_0.35_32/")]
    with_weights = backbone[backbone.android == "frozen"]
    assert len(with_weights) > 50  # every conv / depthwise / BN of the backbone
    assert (with_weights.ios == "frozen").all() and (with_weights.params > 0).all()
    assert with_weights.frozen.astype(bool).all()  # counted, and marked frozen
    assert set(backbone.android) <= {"frozen", "runs"}
    assert set(backbone.ios) <= {"frozen", "runs"}
    for layer in ADAPTER:
        row = table.loc[layer]
        assert row.android == "trained" and row.params > 0
        assert row.ios == "frozen on iOS" and "Android trains it" in row.ios_why
    assert "not back-propagate" in table.loc["adapter"].ios_why  # the ReLU6 after it
    assert "BatchNormalization" in table.loc["adapter_bn"].ios_why
    assert table.loc[HEAD, "android"] == "trained" and table.loc[HEAD, "ios"] == "trained"
    assert table.loc["adapter_relu6", "ios"] == "runs"

    # canonical parameters are the trainable part only; the masks follow the plan
    layers = [p["layer"] for p in m["parameters"]]
    assert layers == ["adapter", "adapter", "adapter_bn", "adapter_bn", HEAD, HEAD]
    head = _indices(m, (HEAD,))
    assert params.trained_mask(m, "android") == [True] * 6
    assert params.trained_mask(m, "ios") == [i in head for i in range(6)]
    assert [e["canonical"] for e in m["platforms"]["ios"]["coreml_layers"]] == head
    assert len(m["platforms"]["android"]["tflite_layers"]) == 6
    # the backbone is baked: described by its digest, never a canonical parameter
    frozen = m["frozen"]
    assert len(frozen["sha256"]) == 64 and frozen["tensors"] > 200
    assert frozen["elements"] > 30 * _elements(m, range(6))
    assert export.parity["ok"].all(), export.parity


# -- a round replayed in this process ---------------------------------------------------------
@pytest.fixture(scope="module")
def runtimes(export):
    return {p: runtime.load(export, p) for p in ("android", "ios")}


def _clients(platforms, seed=SEED):
    n = len(platforms)
    return [(p, device_data(DATA, "iid", n, k, seed=seed)) for k, p in enumerate(platforms)]


def _replay(manifest, runtimes, clients, prev, seed):
    """The round every client computes from the global ``prev`` (same data, same per-round
    seed as a phone), averaged both ways: masked (each parameter over the clients that
    trained it: the rule) and plain (every client's copy counted: what must not happen)."""
    updates = []
    for platform, d in clients:
        rt = runtimes[platform]
        rt.set_parameters(params.to_platform(prev, manifest, platform))
        rt.fit(d.x_train, d.y_train, epochs=1, seed=seed)
        canon = params.from_platform(rt.get_parameters(), manifest, platform, base=prev)
        updates.append((params.trained_mask(manifest, platform), canon, len(d.x_train)))
    masked, plain = [], []
    for i in range(len(prev)):
        num = sum(n * u[i] for mask, u, n in updates if mask[i])
        masked.append(num / sum(n for mask, _, n in updates if mask[i]))
        plain.append(sum(n * u[i] for _, u, n in updates) / sum(n for *_, n in updates))
    return masked, plain


def _round_globals(session, name=NAME):
    """The global model after each round (0: the start), from the session's checkpoints."""
    folder = session.registry.checkpoint_dir / name / f"session-{session.id}"
    out = {}
    for path in sorted(folder.glob("round-*.npz")):
        with np.load(path) as data:
            out[int(path.stem.split("-")[1])] = [data[f"arr_{i}"] for i in range(len(data.files))]
    return out


def _check_rounds(export, runtimes, globals_, rounds, platforms):
    """Every round's global is the masked average of what the clients computed: the adapter
    is Android's alone (iOS's baked copies never enter), the head everyone's."""
    m = export.manifest
    adapter, head = _indices(m, ADAPTER), _indices(m, (HEAD,))
    assert sorted(globals_) == list(range(rounds + 1))
    clients = _clients(platforms)
    prev = initial_parameters(m)
    for got, want in zip(globals_[0], prev, strict=True):  # round 0: the export's start
        np.testing.assert_array_equal(got, want)
    for rnd in range(1, rounds + 1):
        got = globals_[rnd]
        masked, plain = _replay(m, runtimes, clients, prev, SEED + rnd - 1)
        for i in range(len(got)):
            np.testing.assert_allclose(got[i], masked[i], atol=2e-5, err_msg=f"round {rnd} #{i}")
        for i in adapter:  # counting iOS's copies would have halved Android's step
            step = np.abs(np.asarray(got[i]) - prev[i]).max()
            assert step > 1e-4, (rnd, i, step)
            assert np.abs(np.asarray(got[i]) - plain[i]).max() > 0.25 * step, (rnd, i)
        for i in head:
            assert np.abs(np.asarray(got[i]) - prev[i]).max() > 1e-4, (rnd, i)
        prev = [np.asarray(a) for a in got]
    return prev


# -- a mixed fleet of device processes --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mixed_fleet_trains_adapter_on_android_only_and_backbone_never_travels(
        export, runtimes, tmp_path):
    m = export.manifest
    rounds = 2  # the second round starts from the first's global: enough to chain them
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(export)
        session = wb.train(NAME, rounds=rounds, min_clients=4, round_timeout=120)
        fleet = wb.spawn_devices(android=2, ios=2, dataset=DATA, partition="iid", seed=SEED)
        assert session.wait(timeout=400) == "finished", fleet.table
        table = fleet.wait(timeout=60)
        hist = session.history
        rejections = session.rejections
        globals_ = _round_globals(session)
    assert list(table.status) == ["finished"] * 4, table
    assert list(table.rounds_done) == [rounds] * 4, table
    assert rejections.empty, rejections  # every device reported this export's frozen digest

    # bytes per update: iOS sends the head only, Android every canonical tensor; the
    # backbone's ~400k values go nowhere
    head = _indices(m, (HEAD,))
    by = hist.set_index(["round", "platform", "metric"])["value"]
    ios_bytes, android_bytes = 4 * _elements(m, head), 4 * _elements(m, range(6))
    assert (ios_bytes, android_bytes) == (360, 41416)
    for rnd in range(1, rounds + 1):
        assert by[(rnd, "ios", "bytes_per_update")] == ios_bytes
        assert by[(rnd, "android", "bytes_per_update")] == android_bytes
        assert by[(rnd, "ios", "bytes_down")] == 2 * ios_bytes  # the global goes down the same
        assert by[(rnd, "android", "bytes_down")] == 2 * android_bytes
        for platform in ("android", "ios"):
            assert by[(rnd, platform, "clients")] == 2
            assert by[(rnd, platform, "rejected")] == 0
    assert android_bytes < 4 * m["frozen"]["elements"] / 30
    # the count of tensors exchanged is the manifest's (a phone holding another count
    # would have been rejected above)
    assert len(params.platform_shapes(m, "ios")) == len(head) == 2
    assert len(params.platform_shapes(m, "android")) == len(m["parameters"]) == 6

    final = _check_rounds(export, runtimes, globals_, rounds, ["android"] * 2 + ["ios"] * 2)
    start = initial_parameters(m)
    for i in range(6):
        assert not np.allclose(final[i], start[i]), m["parameters"][i]["name"]


# -- an update computed on another backbone, on the wire --------------------------------------
class StalePhone(WirePhone):
    """A protocol-level phone that tags every FitRes with a frozen-weights digest."""

    def __init__(self, *args, frozen_sha256: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.frozen_sha256 = frozen_sha256

    def _on_fit(self, ins):
        msg = super()._on_fit(ins)
        msg.fit_res.metrics["frozen_sha256"].string = self.frozen_sha256
        return msg


def _nudge(seed):
    rng = np.random.default_rng(seed)
    return lambda ts, _r: [t + rng.standard_normal(t.shape).astype(np.float32) * 0.1 for t in ts]


@pytest.mark.timeout(300)
def test_update_from_another_backbone_is_refused_and_round_goes_on(export, tmp_path):
    m = export.manifest
    ours = m["frozen"]["sha256"]
    other = graph.analyze(transfer_model(seed=SEED + 1)).frozen["sha256"]
    assert other != ours
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(export)
        s = wb.train(NAME, rounds=1, min_clients=3, round_timeout=60)
        android = StalePhone(wb.url, "android", DATA, _nudge(1), num_examples=20,
                             device_id=71, frozen_sha256=ours)
        ios = StalePhone(wb.url, "ios", DATA, _nudge(2), num_examples=10, device_id=72,
                         frozen_sha256=ours)
        stale = StalePhone(wb.url, "android", DATA, _nudge(3), num_examples=1000,
                           device_id=73, frozen_sha256=other)
        threads = [p.start() for p in (android, ios, stale)]
        assert s.wait(timeout=120) == "finished"
        for t in threads:
            t.join(30)
        rej = s.rejections
        by = s.history.set_index(["round", "platform", "metric"])["value"]
        final = s.global_parameters()
    for phone in (android, ios, stale):
        assert phone.report.error is None, phone.report.error
        assert phone.report.rounds_fit == 1
    assert len(rej) == 1 and rej.platform[0] == "android", rej
    reason = rej.reason[0]
    assert "different frozen weights" in reason and other[:12] in reason and ours[:12] in reason
    assert "download this session's model" in reason
    assert by[(1, "android", "rejected")] == 1 and by[(1, "android", "clients")] == 1
    assert by[(1, "ios", "clients")] == 1 and by[(1, "all", "clients")] == 2
    # the round went on with the two others: adapter = Android's, head = both, by examples
    a = params.from_platform(android.report.sent[0], m, "android")
    i = params.from_platform(ios.report.sent[0], m, "ios", base=initial_parameters(m))
    head = _indices(m, (HEAD,))
    for k, got in enumerate(final):
        want = (20 * a[k] + 10 * i[k]) / 30 if k in head else a[k]
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=m["parameters"][k]["name"])


# -- Flower's Simulation Engine, same export --------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulation_engine_runs_the_transfer_model_unchanged(export, runtimes, tmp_path,
                                                             shared_ray):
    rounds = 2
    # on the run's shared Ray head (a Ray of its own is tested in test_simulation.py)
    sim = xflwb.simulate(export, android=2, ios=2, dataset=DATA, partition="iid",
                         rounds=rounds, seed=SEED, data_dir=tmp_path / "d", timeout=500,
                         ray_address=shared_ray, progress=False)
    assert sim.status == "finished", sim.info["error"]
    hist = sim.history
    assert {"android", "ios", "all"} <= set(hist.platform)
    by = hist.set_index(["round", "platform", "metric"])["value"]
    m = export.manifest
    for rnd in range(1, rounds + 1):
        assert by[(rnd, "android", "clients")] == 2 and by[(rnd, "ios", "clients")] == 2
        assert by[(rnd, "ios", "rejected")] == 0 and by[(rnd, "android", "rejected")] == 0
    assert sim.rejections.empty  # simulated clients send this export's frozen digest too
    acc = hist.query("metric == 'accuracy'").set_index(["round", "platform"])["value"]
    assert {"android", "ios"} <= set(acc.index.get_level_values("platform"))
    final = _check_rounds(export, runtimes, _round_globals(sim), rounds,
                          ["android"] * 2 + ["ios"] * 2)
    np.testing.assert_allclose(sim.global_parameters()[4], final[4])
    start = initial_parameters(m)
    for i in _indices(m, (HEAD, *ADAPTER)):
        assert not np.allclose(final[i], start[i]), m["parameters"][i]["name"]
