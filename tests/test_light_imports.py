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
