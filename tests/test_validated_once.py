"""Options typed end to end and validated once per start (issue 22, item 3).

A session's options are checked once on the way in (``xflwb._options.validations`` counts
each option class's checks in this process), stored by the registry as the dataclass's
JSON and rebuilt by the session process with ``from_stored``, which trusts that JSON (no
second check) but refuses keys a newer xflwb wrote. The strategy's arguments come from the
options in one place (``RoundOptions.strategy_arguments``).
"""

from __future__ import annotations

import dataclasses
import json

import keras
import pytest

import xflwb
from tests.conftest import SERVED_TOY_MANIFEST, toy_canonical
from xflwb import _options
from xflwb.admin import AdminClient
from xflwb.federation.fedbuff import FedBuff
from xflwb.server.config import SessionConfig
from xflwb.sessions.flower_strategy import CrossPlatformStrategy
from xflwb.sessions.options import RoundOptions, core_parameters, is_asynchronous
from xflwb.simulation.config import SimulationConfig
from xflwb.widgets.dashboard import fedbuff_plan

pytestmark = pytest.mark.timeout(300)


def _stored(cfg: object) -> dict:
    """What the registry stores and the session process reads back."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


@pytest.mark.parametrize("cfg", [
    SessionConfig(rounds=3, strategy="FedAdam", strategy_options={"eta": 0.1},
                  privacy=None, tracking="tensorboard", tracking_dir="runs"),
    SessionConfig(strategy="fedbuff", strategy_options=FedBuff(buffer_size=2)),
    SimulationConfig(android=2, ios=1, rounds=2, secagg={}, fraction_fit=1.0),
], ids=["session", "fedbuff", "simulation"])
def test_from_stored_rebuilds_the_stored_options_without_validating(cfg):
    stored = _stored(cfg)
    before = _options.validations.copy()
    again = type(cfg).from_stored(stored)
    assert _options.validations == before  # trusted: validated before it was stored
    assert type(again) is type(cfg) and again == cfg
    assert _stored(again) == stored


def test_from_stored_refuses_keys_of_a_newer_xflwb_and_fills_an_older_ones():
    stored = _stored(SessionConfig(rounds=2))
    with pytest.raises(_options.OptionError, match=r"'warp_speed'.*newer xflwb"):
        SessionConfig.from_stored({**stored, "warp_speed": 9})
    older = {k: v for k, v in stored.items() if k != "keep_every"}
    before = _options.validations["SessionConfig"]
    cfg = SessionConfig.from_stored(older)  # an older row: its missing fields filled, checked
    assert cfg.keep_every is None and cfg.rounds == 2
    assert _options.validations["SessionConfig"] == before + 1


def test_strategy_arguments_are_the_options_the_core_takes():
    cfg = SessionConfig(strategy="fedyogi", min_clients=1, fraction_fit=0.5, local_epochs=2,
                        max_update_norm=3.0)
    args = cfg.strategy_arguments()
    round_fields = {f.name for f in dataclasses.fields(RoundOptions)}
    assert set(args) == round_fields & core_parameters()
    assert {"strategy", "fraction_fit", "min_clients", "privacy"} <= set(args)
    assert "rounds" not in args and "host" not in args  # not the core's
    strategy = CrossPlatformStrategy(SERVED_TOY_MANIFEST, toy_canonical(0), **args)
    assert (strategy.core.fraction_fit, strategy.core.min_clients,
            strategy.core.local_epochs) == (0.5, 1, 2)
    assert type(strategy.inner).__name__ == "FedYogi"
    # FedBuff's loop reuses the synchronous per-client steps; its options are its own
    fb = SessionConfig(strategy="fedbuff", strategy_options={"buffer_size": 3})
    assert fb.strategy_arguments()["strategy"] == "fedavg"
    assert fb.strategy_arguments()["strategy_options"] == {}


def test_one_is_asynchronous_for_options_stored_dicts_and_names():
    fb = SessionConfig(strategy="fedbuff")
    assert is_asynchronous(fb) and is_asynchronous(_stored(fb)) and is_asynchronous("FedBuff")
    assert not is_asynchronous(SessionConfig()) and not is_asynchronous({})


def test_dashboard_reads_fedbuffs_own_defaults():
    stored = {"strategy": "fedbuff", "rounds": 7, "strategy_options": {}}
    default = FedBuff()
    assert fedbuff_plan({"config": stored}) == {"buffer_size": default.buffer_size,
                                                "versions": 7}
    stored["strategy_options"] = {"buffer_size": 3, "max_versions": 5}
    assert fedbuff_plan({"config": stored}) == {"buffer_size": 3, "versions": 5}
    assert fedbuff_plan({"config": {"strategy": "fedavg", "rounds": 2}}) is None


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    return xflwb.export(model, name="once", data_type="once-data",
                        out_dir=tmp_path_factory.mktemp("exports"))


def test_a_start_validates_its_options_once_per_side(tmp_path, export):
    """``wb.train``: once (the workbench's check is the one stored and run); the admin
    API (``xflwb train``): once before sending and once by the backend, which trusts no
    HTTP body; the session processes rebuild the stored options without a check and run."""
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0, admin_token="tok") as wb:
        wb.publish(export)
        before = _options.validations["SessionConfig"]
        session = wb.train("once", rounds=2, min_clients=1, round_timeout=60,
                           strategy="fedavg", privacy=xflwb.DP(noise_multiplier=0.5,
                                                               clipping_norm=1.0))
        assert _options.validations["SessionConfig"] - before == 1
        assert session.status == "running"  # its process loaded the stored options
        stored = session.info["config"]
        assert stored["host"] == wb.host and stored["privacy"]["noise_multiplier"] == 0.5
        assert SessionConfig.from_stored(stored).privacy == stored["privacy"]
        session.stop()

        client = AdminClient(wb.url, "tok")
        before = _options.validations["SessionConfig"]
        remote = client.train("once", rounds=1, min_clients=1, local_epochs=2)
        assert _options.validations["SessionConfig"] - before == 2  # client + backend
        assert remote.config["local_epochs"] == 2 and remote.config["rounds"] == 1
        assert wb.session(remote.id).status == "running"
        remote.stop()
