"""Virtual iPhones and session processes must stay light: no TensorFlow, no coremltools."""

from __future__ import annotations

import keras

import xflwb
from tests.conftest import run_python


def test_ios_runtime_and_session_code_do_not_import_tensorflow(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    res = xflwb.export(model, name="light", out_dir=tmp_path, platforms="ios")
    code = (
        "import sys, numpy as np\n"
        "from xflwb.bridge import runtime\n"
        "import xflwb.sessions.manager, xflwb.server.session_process\n"
        "import xflwb.sessions.flower_strategy, xflwb.devices.device\n"
        f"rt = runtime.load({str(res.paths['manifest'])!r}, 'ios')\n"
        "rt.fit(np.ones((5, 4), np.float32), np.arange(5) % 3, epochs=1)\n"
        "heavy = [m for m in ('tensorflow', 'coremltools', 'keras') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('light')\n")
    assert "light" in run_python(code).stdout


def test_simulation_driver_does_not_import_tensorflow():
    """The simulation process imports Flower's Simulation Engine without TensorFlow (its
    only use there is a GPU helper xflwb never calls), and leaves it importable for later."""
    code = (
        "import sys, importlib.util\n"
        "import xflwb.simulation.server\n"
        "from xflwb.flower_legacy import secagg_api, simulation_api\n"
        "api = simulation_api(); secagg_api()\n"
        "from xflwb.simulation import client, fedbuff, secagg, sync\n"
        "import flwr.simulation.ray_transport.utils as flwr_utils\n"
        "assert callable(api.run_simulation)\n"
        "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert flwr_utils.TF is None, 'flwr.simulation was imported with TensorFlow'\n"
        "assert importlib.util.find_spec('tensorflow') is not None  # the mask was lifted\n"
        "print('light')\n")
    assert "light" in run_python(code).stdout


def test_android_runtime_loads_only_tflite_and_trains_as_under_full_tensorflow(tmp_path):
    """A virtual Android phone loads TFLite's interpreter and TF's kernels (the Flex delegate
    runs the gradient ops), not TensorFlow's Python API: the same losses and parameters,
    bit for bit, as in a process that imported TensorFlow first; and a later
    ``import tensorflow`` is whole and shares the interpreter class."""
    from tests.conftest import digits_cnn

    res = xflwb.export(digits_cnn(), name="lite", out_dir=tmp_path, platforms="android",
                       data_type="digits")
    train = (
        "import sys, numpy as np\n"
        "from xflwb.bridge import runtime\n"
        f"rt = runtime.load({str(res.paths['manifest'])!r}, 'android')\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.random((40, 8, 8, 1), dtype=np.float32); y = rng.integers(0, 10, 40)\n"
        "h = rt.fit(x, y, epochs=2, seed=3)\n"
        "print('RESULT', repr(h), [p.tobytes().hex() for p in rt.get_parameters()])\n")
    light = run_python(
        train + "heavy = [m for m in ('tensorflow.python.framework.ops', 'keras',\n"
        "         'tensorflow.lite.python.lite') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "lite = sys.modules['tensorflow.lite.python.interpreter']\n"
        "import tensorflow as tf\n"
        "assert tf.lite.Interpreter is lite.Interpreter\n"
        "assert float(tf.reduce_sum(tf.ones((2, 3)))) == 6.0\n"
        "assert tf.keras.layers.Dense(2)(tf.ones((1, 3))).shape == (1, 2)\n").stdout
    import contextlib
    import io

    import tensorflow  # noqa: F401  (the reference: this process has all of TensorFlow)

    full = io.StringIO()
    with contextlib.redirect_stdout(full):
        exec(train, {})  # the same lines, in this process

    def result(out: str) -> str:
        return next(line for line in out.splitlines() if line.startswith("RESULT"))

    assert result(light) == result(full.getvalue())


def test_partitioning_digits_imports_no_plotting_or_scikit_learn():
    """A device's (or simulated client's) data: the digits file scikit-learn ships, split by
    flwr-datasets' partitioner, without flwr-datasets' plots (seaborn, scipy.stats) or
    scikit-learn itself; the images and labels are ``load_digits``'s, exactly."""
    code = (
        "import sys, numpy as np\n"
        "from xflwb.devices.partition import device_data\n"
        "from xflwb.devices.datasets import _digits_arrays\n"
        "d = device_data('digits', 'dirichlet:0.5', 4, 1, seed=1)\n"
        "assert len(d.y_train) > 0\n"
        "heavy = [m for m in ('seaborn', 'scipy.stats', 'sklearn', 'flwr_datasets.visualization')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "images, target = _digits_arrays()\n"
        "from sklearn.datasets import load_digits\n"
        "ref = load_digits()\n"
        "assert images.dtype == ref.images.dtype and np.array_equal(images, ref.images)\n"
        "assert target.dtype == ref.target.dtype and np.array_equal(target, ref.target)\n"
        "import flwr_datasets  # the real package, whole, with the partitioner already loaded\n"
        "assert flwr_datasets.FederatedDataset and flwr_datasets.visualization\n"
        "assert flwr_datasets.partitioner is sys.modules['flwr_datasets.partitioner']\n"
        "print('light')\n")
    assert "light" in run_python(code).stdout


def test_a_ray_worker_imports_flowers_actor_and_our_client_without_the_server_side():
    """``prepare_ray_worker`` (every simulation's Ray ``worker_process_setup_hook``) loads
    Flower's actor module alone, and our simulated client only Flower's client side: no
    TensorFlow, no Simulation Engine server (SuperLink state, SQLAlchemy). Both stay
    importable whole afterwards, sharing the modules already loaded."""
    code = (
        "import sys\n"
        "from xflwb.flower_legacy import prepare_ray_worker\n"
        "prepare_ray_worker()\n"
        "actor = sys.modules['flwr.simulation.ray_transport.ray_actor']\n"
        "assert actor.ClientAppActor\n"
        "import xflwb.simulation.client\n"
        "heavy = ('tensorflow', 'keras', 'sqlalchemy', 'alembic', 'flwr.simulation',\n"
        "         'flwr.simulation.app')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "from flwr.simulation import run_simulation  # the real package, whole\n"
        "import flwr.simulation.ray_transport.ray_actor as again\n"
        "assert again is actor and callable(run_simulation)\n"
        "print('light')\n")
    assert "light" in run_python(code).stdout


def test_import_xflwb_and_a_phones_start_up_load_only_what_they_use():
    """``import xflwb`` loads no public name until it is used (PEP 562), and a virtual
    phone's start-up (its parser, options, data) loads neither the registry's SQL nor
    Flower nor plots (pandas only with the partitioner); error classes still say ``xflwb``
    in such a process (tracebacks)."""
    code = (
        "import sys\n"
        "import xflwb\n"
        "heavy = ('numpy', 'pandas', 'sqlalchemy', 'flwr', 'tensorflow', 'keras', 'matplotlib')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "import xflwb.devices.entry, xflwb.devices.device\n"
        "from xflwb.devices.partition import device_data\n"
        "loaded = [m for m in heavy if m in sys.modules and m != 'numpy']\n"
        "assert not loaded, loaded\n"
        "device_data('digits', 'iid', 2, 0, seed=0)  # flwr-datasets' partitioner: pandas\n"
        "loaded = [m for m in heavy if m in sys.modules and m not in ('numpy', 'pandas')]\n"
        "assert not loaded, loaded\n"
        "from xflwb.errors import DeviceFailure, InputError\n"
        "from xflwb.bridge.manifest import ManifestError\n"
        "assert {c.__module__ for c in (DeviceFailure, InputError, ManifestError)} == {'xflwb'}\n"
        "assert xflwb.InputError is InputError and 'Workbench' in dir(xflwb)\n"
        "assert xflwb.workbench.Workbench is xflwb.Workbench  # a submodule, as before\n"
        "try:\n"
        "    xflwb.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('xflwb.no_such_name resolved')\n"
        "print('light')\n")
    assert "light" in run_python(code).stdout


def test_a_fleet_device_takes_its_rows_from_the_fleets_file_without_a_partitioner(tmp_path):
    """A fleet partitions once and writes every device's rows (``--partition-file``): a
    device reading them gets the data it would have computed, without importing
    flwr-datasets, Hugging Face datasets or pandas; a file that is not one is refused with
    exit code 2, naming it."""
    import subprocess
    import sys

    import numpy as np

    from xflwb.devices.partition import dataset_indices, device_data

    path = tmp_path / "partitions.npz"
    np.savez(path, *dataset_indices("digits", "dirichlet:0.5", 4, 1))
    code = (
        "import sys\n"
        "from xflwb.devices.entry import _read_indices\n"
        "from xflwb.devices.partition import device_data\n"
        f"d = device_data('digits', 'dirichlet:0.5', 4, 2, seed=1,\n"
        f"                indices=_read_indices({str(path)!r}))\n"
        "heavy = ('flwr_datasets', 'datasets', 'pandas', 'sklearn')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print(d.y_train.tolist(), d.y_test.tolist())\n")
    own = device_data("digits", "dirichlet:0.5", 4, 2, seed=1)
    assert run_python(code).stdout.strip() == f"{own.y_train.tolist()} {own.y_test.tolist()}"

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    proc = subprocess.run([sys.executable, "-m", "xflwb.devices", "--backend",
                           "http://127.0.0.1:9", "--platform", "ios", "--partition-file",
                           str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--partition-file {bad}" in proc.stderr, proc.stderr[-2000:]
