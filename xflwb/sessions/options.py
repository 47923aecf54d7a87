"""How rounds run: the options phone sessions and simulations share, declared once.

``RoundOptions`` is the base of the phone session's ``SessionConfig``
(``xflwb.server.config``) and of ``SimulationConfig`` (``xflwb.simulation.config``): a
round option added here is one field for both engines. ``is_asynchronous`` is the one test
of whether a stored config ran without rounds (FedBuff), for every view.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from xflwb import _options
from xflwb._options import option
from xflwb.errors import InputError
from xflwb.federation.aggregate import DEFAULT_MAX_EXAMPLES, ROBUST_RULE_NAMES
from xflwb.federation.influence import DEFAULT_MAX_NORM_RATIO, DEFAULT_MAX_WEIGHT_RATIO
from xflwb.federation.policies import SYNCHRONOUS

#: checkpoints a session keeps by default (``keep_checkpoints``): enough to fall back past
#: a few corrupt files, few enough that FedBuff's thousands of versions cannot fill a disk
DEFAULT_KEEP_CHECKPOINTS = 5


#: the strategies without rounds (FedBuff: ``xflwb.federation.versions``): versions replace
#: rounds
ASYNC_STRATEGIES = ("fedbuff",)
#: every synchronous policy registered in ``xflwb.federation.policies.POLICIES`` (one module
#: each; importing them imports no Flower, so building a parser stays light), then FedBuff
STRATEGIES = (*SYNCHRONOUS, *ASYNC_STRATEGIES)


def is_asynchronous(config: Any) -> bool:
    """Whether a session config (a ``RoundOptions``, its stored dict, or a strategy name)
    runs without rounds (its rounds are model versions): the one test, for every engine
    and view."""
    strategy = (config if isinstance(config, str) else config.get("strategy", "")
                if isinstance(config, dict) else getattr(config, "strategy", ""))
    return str(strategy).lower() in ASYNC_STRATEGIES


@functools.cache
def core_parameters() -> frozenset[str]:
    """The keyword options the federation core takes (``Round.build`` and ``Round``): a
    ``RoundOptions`` field of the same name reaches the core without a keyword list
    (``RoundOptions.strategy_arguments``)."""
    from xflwb.federation.rounds import Round

    params = [*inspect.signature(Round.build).parameters.values(),
              *inspect.signature(Round.__init__).parameters.values()]
    return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)


_Options = TypeVar("_Options", bound="RoundOptions")


@dataclass
class RoundOptions:
    """How rounds run: the options phone sessions and simulations share, declared once."""

    rounds: int = option(10, "federated rounds to run", ge=1, le=1_000_000)
    strategy: str = option("fedavg", "Flower strategy aggregating the canonical updates",
                           choices=STRATEGIES)
    strategy_options: dict[str, Any] = option(
        default_factory=dict, help="keyword arguments of the Flower strategy (e.g. "
        '{"beta": 0.2} for fedtrimmedavg), or xflwb.FedBuff(...) / its dict for fedbuff')
    min_clients: int | None = option(
        None, "clients a round needs before it starts (none: 2, or the whole simulated fleet "
        "if smaller)", ge=1, le=1_000_000)
    fraction_fit: float = option(1.0, "fraction of the connected clients sampled to train "
                                 "each round", gt=0, le=1)
    fraction_evaluate: float | None = option(
        None, "fraction sampled to evaluate each round (none: as fraction_fit)", ge=0, le=1)
    local_epochs: int = option(1, "epochs each client trains per round", ge=1, le=100_000)
    round_timeout: float = option(600.0, "seconds a round waits for its clients", gt=0,
                                  le=30 * 86400)
    #: production round rules (``xflwb.federation.schedule``; phones: the wait and the fits
    #: kept, ``xflwb.sessions.flower_strategy``)
    over_select: float = option(
        0.0, "select this fraction more clients than a round needs (0.3: 30 percent more) "
        "and keep the first to report; the rest count as stragglers", ge=0, le=10)
    deadline: float | None = option(
        None, "seconds a selected client has to report (simulated seconds in a simulation, "
        "wall seconds on phones); later reports count as stragglers; none: no deadline",
        gt=0, le=30 * 86400)
    max_examples: int | None = option(
        DEFAULT_MAX_EXAMPLES, "one update counts for at most this many examples (larger "
        "num_examples are capped and counted in the round's capped metric); none: no cap",
        ge=1, le=2**63 - 1)
    max_update_norm: float | None = option(
        None, "reject updates farther than this (L2, canonical space, over the tensors the "
        "client's platform trains) from the global model; none: no bound", gt=0)
    #: relative bounds on by default (xflwb.federation.influence, docs/security.md): one phone
    #: must not steer the model by lying about its examples or sending a huge update
    max_weight_ratio: float | None = option(
        DEFAULT_MAX_WEIGHT_RATIO, "one update counts for at most this multiple of the "
        "(lower) median num_examples of its round (FedBuff: of the recent phones); capped "
        "updates are counted in the capped metric; none: off", ge=1, le=1e9)
    max_norm_ratio: float | None = option(
        DEFAULT_MAX_NORM_RATIO, "reject updates farther (L2) from the model they trained "
        "from than this multiple of the (lower) median of recent updates of the same "
        "platform; applies to "
        "fedavg, the server optimisers and fedbuff, not to robust rules, DP (which clips) "
        "or secagg (which hides single updates); none: off", ge=1, le=1e9)
    #: stored as the dict of all ``xflwb.DP`` fields (``xflwb.federation.dp``)
    privacy: dict[str, Any] | None = option(
        None, "differential privacy: xflwb.DP(...) or its dict; none: off")
    #: stored as ``{"up": spec, "down": spec}`` with canonical specs, None when nothing is
    #: compressed (``xflwb.federation.compression``); each client gets a codec only if it
    #: declared it, the others keep float32
    compression: dict[str, Any] | None = option(
        None, 'codecs of updates (up) and of the model sent (down) for clients that declare '
        'them: xflwb.Compression(up="int8", down="fp16"), its dict, "up=int8,down=fp16" or '
        '"int8" (up only); none: float32 both ways', text=True, metavar="SPEC")
    #: checkpoint retention (``xflwb.sessions.checkpoints.prune_checkpoints``)
    keep_checkpoints: int | None = option(
        DEFAULT_KEEP_CHECKPOINTS, "checkpoints a session keeps on disk: the last N written, "
        "plus every keep_every-th round, its start and any a resume needs; none: keep all",
        ge=1, le=1_000_000)
    keep_every: int | None = option(
        None, "also keep the checkpoint of every round (FedBuff: version) divisible by this; "
        "none: no extra ones", ge=1, le=1_000_000)
    #: ``xflwb.sessions.tracking``: written by the session process as rounds land
    tracking: list[str] | str | None = option(
        None, "also log per-round metrics and the options to 'tensorboard', 'mlflow' or "
        "both (a list, or comma-separated); none: off", repeat=True, metavar="NAME")
    tracking_dir: str | None = option(
        None, "where tracked runs go (none: DATA_DIR/tracking): TensorBoard event files "
        "in tensorboard/, the MLflow store in mlruns/", path=True, metavar="DIR")
    tracking_uri: str | None = option(
        None, "MLflow tracking URI (an http:// server, sqlite:///...); none: the local "
        "store in tracking_dir", metavar="URI")

    def strategy_arguments(self) -> dict[str, Any]:
        """The keyword arguments of the session's ``CrossPlatformStrategy`` (the federation
        core's ``Round.build``): every field whose name the core takes
        (``core_parameters``), so a new round option is its field here plus its use in the
        core. FedBuff's loop reuses the synchronous per-client steps (plain fedavg); its
        own options go to its loop, not here. Engine-specific extras (``secure_sums``)
        are the caller's."""
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in core_parameters()}
        if is_asynchronous(self):
            args.update(strategy="fedavg", strategy_options={})
        return args

    @classmethod
    def from_stored(cls: type[_Options], stored: dict[str, Any]) -> _Options:
        """The options a session row stores (``Registry.create_session`` wrote this
        dataclass's JSON after it was validated), rebuilt WITHOUT validating again
        (``xflwb._options.restore``): options are validated once, on the way in. Keys
        this xflwb does not declare (a row from a newer xflwb) are refused with an
        ``OptionError`` naming them."""
        return _options.restore(cls, stored)

    def _check_rounds(self) -> None:
        """The shared checks (``__post_init__`` of each subclass calls this)."""
        for name in ("keep_checkpoints", "keep_every"):
            if getattr(self, name) == 0 and not isinstance(getattr(self, name), bool):
                raise InputError(
                    f"{name}=0 is not allowed: " + (
                        "a session must keep at least its latest checkpoint to resume from; "
                        "pass None to keep every checkpoint, or N >= 1 to keep the last N"
                        if name == "keep_checkpoints" else
                        "pass None for no extra checkpoints, or k >= 1 to keep every k-th "
                        "round's"))
        if isinstance(self.strategy, str):
            self.strategy = self.strategy.lower()
        from xflwb.federation.dp import privacy_dict
        from xflwb.federation.fedbuff import FedBuff

        if isinstance(self.strategy_options, FedBuff):
            self.strategy_options = dataclasses.asdict(self.strategy_options)

        if self.privacy is not None and not isinstance(self.privacy, dict):
            self.privacy = privacy_dict(self.privacy)  # a DP → its dict (checked below)
        from xflwb.federation.compression import compression_dict

        # a Compression, its dict or a spec string → {"up", "down"} or None (did you mean)
        self.compression = compression_dict(self.compression)
        from xflwb.sessions.tracking import normalize

        self.tracking = normalize(self.tracking)  # did you mean …; pip install … when missing
        _options.check(self)
        if self.tracking_dir is not None:  # the session process may run elsewhere (cwd)
            self.tracking_dir = os.path.abspath(os.fspath(self.tracking_dir))
        self.privacy = privacy_dict(self.privacy)
        if self.privacy is not None and self.strategy in ROBUST_RULE_NAMES:
            raise InputError(f"privacy (central DP) cannot be combined with strategy "
                             f"{self.strategy!r}: it noises a mean; use fedavg or a server "
                             "optimiser (fedadam, ...)")
        if self.privacy is not None and is_asynchronous(self):
            raise InputError(f"privacy (central DP) cannot be combined with strategy "
                             f"{self.strategy!r}: its ε ledger composes rounds of sampled "
                             "clients, which asynchronous training does not have; use "
                             "fedavg or a server optimiser")
        if is_asynchronous(self) and (self.over_select or self.deadline is not None):
            raise InputError(f"over_select and deadline are rules of synchronous rounds; "
                             f"strategy {self.strategy!r} has none: every idle phone trains "
                             "and a late update is weighed by its staleness (drop them, or "
                             "bound staleness with strategy_options max_staleness)")
        if is_asynchronous(self) and self.fraction_fit != 1.0:
            raise InputError(f"fraction_fit={self.fraction_fit:g} does not apply to strategy "
                             f"{self.strategy!r}: every idle phone trains; bound the phones "
                             "training at once with strategy_options max_concurrency")
        if self.fraction_evaluate is None:
            self.fraction_evaluate = self.fraction_fit
        self.strategy_options = check_strategy_options(self.strategy, self.strategy_options)


def check_strategy_options(strategy: str, options: Any) -> dict[str, Any]:
    """Flower's own constructor for ``strategy`` checks ``options`` before any process
    starts (FedTrimmedAvg's ``beta`` in [0, 0.5), no option the class does not take); for
    FedBuff, ``xflwb.FedBuff`` does. Returns the options to store (FedBuff's: every field,
    defaults filled in)."""
    from xflwb.federation.policies import build

    if not isinstance(options, dict):
        raise InputError(f"strategy_options must be a dict, got {type(options).__name__}")
    if is_asynchronous(strategy):
        from xflwb.federation.fedbuff import fedbuff_options

        return dataclasses.asdict(fedbuff_options(options))  # ValueError: did you mean …
    try:  # the policy's Flower class checks them as its constructor does
        build(strategy, [np.zeros(1, np.float32)], options)
    except (TypeError, ValueError) as exc:  # one line naming the option (OptionError)
        raise _options.OptionError(f"strategy_options {options!r} do not fit strategy "
                                   f"{strategy!r}: {exc}") from None
    return options
