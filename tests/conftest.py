"""Shared fixtures and helpers: small Keras models built fresh (and seeded) for every test, and
the hand-written toy manifest with stand-in clients for the params/strategy tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from tests.support import wait_until
from xflwb.bridge import params
from xflwb.flower_legacy import ClientProxy, Code, FitRes, Parameters, Status


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (for what a module import or process-wide setting
    does to a process); fails the test with its stderr unless it exits 0."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def digits_cnn(seed: int = 1):
    """The digits CNN shape: conv same → maxpool → flatten → dense softmax."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])


@pytest.fixture
def cnn():
    return digits_cnn(1)


@pytest.fixture
def mlp():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(8, activation="sigmoid"),
        keras.layers.Dense(4, activation="softmax"),
    ])


@pytest.fixture
def unseen():
    """Non-square two-channel input, stride-2 same conv, max-pool, flatten, two dense."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((9, 7, 2))
    h = keras.layers.Conv2D(6, (3, 2), strides=2, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D((2, 2), padding="same")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(12, activation="relu")(h)
    out = keras.layers.Dense(5, activation="softmax")(h)
    return keras.Model(inp, out, name="unseen")


@pytest.fixture(scope="session")
def ip():
    """One IPython shell for the whole run (IPython allows a single global instance)."""
    from IPython.testing.globalipapp import get_ipython, start_ipython

    shell = start_ipython() or get_ipython()
    shell.run_line_magic("load_ext", "xflwb")
    return shell


TRANSFER_NAME, TRANSFER_DATA = "transfer", "digits32"


def transfer_model(seed: int = 0):
    """Frozen MobileNetV2 (α 0.35, 32×32×3, random weights: nothing is downloaded) → trainable
    1×1 conv adapter → BatchNormalization → ReLU6 → global average → softmax head."""
    import keras

    from xflwb.devices import datasets

    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None)
    # A random MobileNetV2 with BatchNormalization at its initial statistics (mean 0, var 1)
    # shrinks every image to ~1e-12: the adapter's kernel would get no gradient at all.
    # Pretrained weights would bring their own statistics; here one batch of images sets
    # them (momentum 0 makes the moving statistics that batch's).
    bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    base(datasets.load(TRANSFER_DATA).x_train[:256], training=True)
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m
    base.trainable = False
    inp = keras.Input((32, 32, 3))
    h = base(inp, training=False)
    h = keras.layers.Conv2D(8, 1, name="adapter")(h)
    h = keras.layers.BatchNormalization(name="adapter_bn")(h)
    h = keras.layers.ReLU(max_value=6.0, name="adapter_relu6")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(10, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name=TRANSFER_NAME)


@pytest.fixture(scope="session")
def transfer_export(tmp_path_factory, request):
    """(model, export) of ``transfer_model``: the one expensive export its tests share, made
    once per run (`once_per_run`: the xdist workers share it)."""
    import xflwb

    # the same model in every worker: transfer_model is deterministic for its seed (its
    # frozen digest equals the export's, tests/test_models.py)
    model = transfer_model()

    def make(directory: Path) -> Any:
        # plain SGD: no optimizer state carries over between rounds, so a round can be
        # replayed
        return xflwb.export(model, name=TRANSFER_NAME, data_type=TRANSFER_DATA,
                            out_dir=directory, optimizer=xflwb.SGD(learning_rate=0.02))

    return model, once_per_run(tmp_path_factory, request, "transfer", make)


def once_per_run(tmp_path_factory: Any, request: Any, key: str, make: Any) -> Any:
    """``make(directory)``'s result, computed once per test run and shared by the xdist
    workers: the first to ask computes it under a file lock in the run's common temp
    directory and pickles it there, the others read it (an export's files are only read
    afterwards). Without xdist it is simply made."""
    import fcntl
    import pickle

    if not hasattr(request.config, "workerinput"):  # not an xdist worker
        return make(tmp_path_factory.mktemp(key))
    # pytest-N/popen-gwK: pytest-N is this run's own and common to its workers
    shared = tmp_path_factory.getbasetemp().parent / f"once-{key}"
    shared.mkdir(exist_ok=True)
    done = shared / "result.pickle"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if done.exists():
            return pickle.loads(done.read_bytes())
        result = make(shared / "made")
        tmp = done.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(result))
        tmp.replace(done)
        return result


def _session_pids(leader: int) -> set[int]:
    """Pids of the processes in the session ``leader`` created (a Ray head started with
    ``start_new_session``: its GCS, raylet, agents and workers), ``leader`` included."""
    import psutil

    pids = {leader}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader:
                pids.add(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie awaiting its reaper counts as gone)."""
    import psutil

    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(scope="session")
def shared_ray(shared_ray_head):
    """The GCS address of ``shared_ray_head`` (what ``ray_address`` takes)."""
    return shared_ray_head["gcs"]


#: Ray starts an idle worker for each new driver (job) ahead of demand; Flower's actors do
#: not use it (they get workers of their own), so every simulation paid for one more
#: Python process importing Ray (~2 s of CPU)
NO_PRESTART = json.dumps({"enable_worker_prestart": False, "prestart_worker_first_driver": False})


@pytest.fixture(scope="session")
def shared_ray_head():
    """One local Ray head for the whole run, started on first use: ``{"gcs": its GCS
    address, "client": its Ray Client address (ray://…)}``. A
    simulation test that does not test Ray's start-up or shutdown attaches with
    ``ray_address`` (each Ray start costs tens of seconds on 2 cores) and only disconnects.

    The head runs in its own session (``--block``): teardown stops that process and checks
    every process of its session is gone; it never stops Ray through Ray's own CLI (which
    stops every Ray on the machine). Its own ``--temp-dir`` keeps its address record out of
    ``/tmp/ray``, so a plain ``ray.init()`` elsewhere (a test of Ray's own start-up, another
    test run) still starts its own Ray instead of joining this one."""
    import shutil
    import signal
    import socket
    import tempfile

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    temp_dir = Path(tempfile.mkdtemp(prefix="xflray"))  # short: Ray's socket paths live here
    record = temp_dir / "ray_current_cluster"
    ray = str(Path(sys.executable).with_name("ray"))
    log = temp_dir.with_suffix(".log")  # beside it: Ray's files go, this is read on failure
    # every port of its own (Ray's defaults are fixed: a second Ray on the machine, another
    # test run's, would collide with them)
    ports = {"--port": 0, "--ray-client-server-port": free_port(),
             "--dashboard-port": free_port(), "--dashboard-agent-listen-port": free_port()}
    # one CPU: each xdist worker has its own head, so two heads share the two cores, and a
    # simulation on it runs one ClientAppActor, i.e. one Ray worker process (Ray, Flower's
    # client side, the runtimes) per simulation instead of two
    with open(log, "wb") as out:
        head = subprocess.Popen([ray, "start", "--head", "--block", "--num-cpus", "1",
                                 *(str(a) for kv in ports.items() for a in kv),
                                 "--temp-dir", str(temp_dir), "--include-dashboard", "false",
                                 "--disable-usage-stats", "--system-config", NO_PRESTART],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pids: set[int] = {head.pid}
    try:
        def up() -> bool:
            if record.exists() and record.read_text().strip():  # written once it is up
                return True
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited with {head.returncode}: "
                            f"{log.read_text(errors='replace')[-3000:]}")
            return False

        # a loaded 2-core machine has taken 80 s
        wait_until(up, 300, "the shared Ray head to come up",
                   describe=lambda: log.read_text(errors="replace")[-3000:])
        yield {"gcs": record.read_text().strip(),
               "client": f"ray://127.0.0.1:{ports['--ray-client-server-port']}"}
    finally:
        pids |= _session_pids(head.pid)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the session this fixture created, only
            head.wait(timeout=60)
        with contextlib.suppress(AssertionError):  # the assertion below names the survivors
            wait_until(lambda: not _alive(pids), 30, "the shared Ray head's processes to end")
        left = _alive(pids)
        for pid in left:  # clean up what this fixture started, by pid, then say so
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log.unlink(missing_ok=True)
        assert not left, f"processes of the shared Ray head survived its stop: {sorted(left)}"


# -- the toy manifest and stand-in clients the params/strategy/robustness tests share --------
# Hand-written (no export): conv → dense → out, with a frozen dense bias on iOS, so the
# layouts and the masking are pinned by numbers a reader can check.
TOY_MANIFEST: dict[str, Any] = {
    "name": "t", "version": 1,
    "parameters": [
        {"name": "conv/kernel", "shape": [3, 2, 2, 5]},
        {"name": "conv/bias", "shape": [5]},
        {"name": "dense/kernel", "shape": [3 * 4 * 5, 7]},
        {"name": "dense/bias", "shape": [7]},
        {"name": "out/kernel", "shape": [7, 2]},
    ],
    "platforms": {
        "android": {"tflite_layers": [240, 20, 240 * 7, 28, 56]},
        "ios": {"coreml_layers": [
            {"name": "conv", "type": "weights", "updatable": True, "shape": [5, 2, 3, 2],
             "canonical": 0, "layout": "conv"},
            {"name": "conv", "type": "bias", "updatable": True, "shape": [5], "canonical": 1,
             "layout": "identity"},
            {"name": "dense", "type": "weights", "updatable": True, "shape": [7, 60],
             "canonical": 2, "layout": "dense_chw", "chw": [5, 3, 4]},
            {"name": "dense", "type": "bias", "updatable": False, "shape": [7], "canonical": 3,
             "layout": "identity"},
            {"name": "out", "type": "weights", "updatable": True, "shape": [2, 7],
             "canonical": 4, "layout": "dense"},
        ]},
    },
}
#: ``TOY_MANIFEST`` as a session serves it: each platform also names its model file
SERVED_TOY_MANIFEST: dict[str, Any] = {
    **TOY_MANIFEST,
    "platforms": {k: {**v, "file": "f", "sha256": "0", "bytes": 1}
                  for k, v in TOY_MANIFEST["platforms"].items()}}


def toy_canonical(seed: int) -> list[np.ndarray]:
    """Random canonical parameters of ``TOY_MANIFEST`` (seeded, so tests can replay them)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p["shape"]).astype(np.float32)
            for p in TOY_MANIFEST["parameters"]]


def toy_fit_res(arrays: list[np.ndarray], n: int, codec: str = "raw") -> FitRes:
    """A Flower ``FitRes`` carrying ``arrays`` encoded the way a phone sends them."""
    tensors = params.encode_tensors(arrays, codec)
    return FitRes(status=Status(Code.OK, ""),
                  parameters=Parameters(tensors=tensors, tensor_type="ND"),
                  num_examples=n, metrics={})


class Phone(ClientProxy):
    """A connected client for strategy tests: only its identity and platform matter."""

    def __init__(self, cid: str, platform: str) -> None:
        super().__init__(cid)
        self.platform = platform

    def get_properties(self, *a: Any) -> Any:  # pragma: no cover - never called
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties
