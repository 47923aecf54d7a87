"""Trace files of device profiles (issue 24 item 1, docs/profiles.md): availability traces
(``client, available_from, available_to``) and device-capacity CSVs (ours and FedScale's
fields). Valid files parse exactly; every broken one is refused with a ``TraceError`` naming
the file, the row and the fix — never another exception (hypothesis over generated files).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import xflwb
from xflwb.federation import profiles as P
from xflwb.federation.fleet import Windows
from xflwb.simulation.config import SimulationConfig

COSTS = {"android": 2e-3, "ios": 1e-3}
EVAL = {"android": 5e-4, "ios": 2.5e-4}
HEADER = ("client", "available_from", "available_to")
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(path: Path, header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    path.write_text("\n".join(",".join(r) for r in [list(header), *rows]) + "\n")
    return str(path)


# -- availability traces: valid ones ------------------------------------------------------------
@st.composite
def traces(draw: st.DrawFn) -> tuple[int, list[tuple[int, float, float]]]:
    """A fleet size and disjoint, non-touching windows per client (some clients none)."""
    n = draw(st.integers(1, 12))
    windows = []
    for c in range(n):
        cuts = draw(st.lists(st.floats(0, 1e6, allow_nan=False), max_size=8, unique=True))
        cuts = sorted(cuts)
        for a, b in zip(cuts[0::2], cuts[1::2], strict=False):
            windows.append((c, a, b))
    return n, windows


@SETTINGS
@given(case=traces(), order=st.randoms(use_true_random=False),
       columns=st.permutations(HEADER))
def test_a_valid_availability_trace_parses_exactly(tmp_path, case, order, columns):
    n, windows = case
    assume(windows)  # a header without rows is refused (below)
    rows = [[{"client": str(c), "available_from": repr(a), "available_to": repr(b)}[k]
             for k in columns] for c, a, b in windows]
    order.shuffle(rows)
    av = P.read_availability_trace(_write(tmp_path / "t.csv", columns, rows), n)
    assert isinstance(av, Windows) and av.period is None and av.n == n
    got = sorted(zip(av.client.tolist(), av.start.tolist(), av.end.tolist(), strict=True))
    assert got == sorted(windows)
    for c, a, b in windows:  # available inside its windows, not after its last
        assert av.available(a)[c] and av.until(a)[c] == b
    last = max(b for _, _, b in windows)
    assert not av.available(last).any() and av.next_change(last) == math.inf


def test_a_trace_file_end_to_end(tmp_path, monkeypatch):
    path = _write(tmp_path / "a.csv", HEADER, [["0", "0", "100"], ["0", "100", "250"],
                                               ["2", "50", "60"], ["1", "0", "10"]])
    av = P.availability({"availability": path}, 3, seed=0)
    assert isinstance(av, Windows)
    assert av.available(0).tolist() == [True, True, False]
    assert av.until(0)[0] == 250  # [0, 100) and [100, 250): one window, no seam
    assert av.next_change(10) == 50 and not av.available(300).any()
    cfg = SimulationConfig(android=2, ios=1, profiles={"availability": path})
    assert cfg.profiles is not None and cfg.profiles["availability"] == path
    # a Path, or a path relative to here: stored absolute (the simulation runs elsewhere)
    assert xflwb.DeviceProfiles(availability=Path(path)).availability == path
    monkeypatch.chdir(tmp_path)
    assert xflwb.DeviceProfiles(devices="a.csv").devices == path


# -- availability traces: broken ones -----------------------------------------------------------
BROKEN = {
    "overlap": ([["0", "0", "100"], ["1", "0", "5"], ["0", "50", "150"]],
                r"rows 2 and 4: client 0's windows \[0, 100\) and \[50, 150\) overlap; "
                r"merge them"),
    "negative": ([["0", "-5", "10"]], r"row 2: available_from -5 is negative"),
    "from >= to": ([["0", "0", "10"], ["1", "20", "20"]],
                   r"row 3: available_from 20 is not before available_to 20"),
    "non-numeric": ([["0", "0", "ten"]], r"row 2: available_to 'ten' is not a number"),
    "empty cell": ([["0", "", "10"]], r"row 2: available_from '' is not a number"),
    "not finite": ([["0", "0", "inf"]], r"row 2: available_to 'inf' is not finite"),
    "outside the fleet": ([["0", "0", "1"], ["3", "0", "1"]],
                          r"row 3: client '3' is not a client of the fleet; write a "
                          r"partition id, an integer in 0\.\.2"),
    "not an integer": ([["1.5", "0", "1"]], r"row 2: client '1.5' is not a client"),
    "short row": ([["0", "0"]], r"row 2: 2 cells for 3 columns"),
    "no rows": ([], r"has a header but no rows"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_trace_is_refused_naming_file_row_and_fix(tmp_path, name):
    rows, match = BROKEN[name]
    path = _write(tmp_path / "trace.csv", HEADER, rows)
    with pytest.raises(P.TraceError, match=r"^" + re.escape(path) + ", " + match
                       if name != "no rows" else match):
        P.read_availability_trace(path, 3)
    # and before a simulation starts
    with pytest.raises(P.TraceError):
        SimulationConfig(android=3, profiles={"availability": path})


@pytest.mark.parametrize("header, match", [
    (("client", "available_from", "availabe_to"),
     r"row 1: unknown column 'availabe_to'; did you mean 'available_to'\?"),
    (("client", "available_from"), r"row 1: missing column\(s\) available_to"),
    (("client", "available_from", "available_to", "client"),
     r"row 1: column 'client' appears twice"),
])
def test_a_bad_header_is_refused_naming_the_column(tmp_path, header, match):
    path = _write(tmp_path / "h.csv", header, [["0"] * len(header)])
    with pytest.raises(P.TraceError, match=match):
        P.read_availability_trace(path, 3)


def test_an_empty_trace_file_is_refused(tmp_path):
    (tmp_path / "e.csv").write_text("\n  \n")
    with pytest.raises(P.TraceError, match=r"e\.csv is empty; it needs a header row"):
        P.read_availability_trace(str(tmp_path / "e.csv"), 3)
    (tmp_path / "b.csv").write_bytes(b"client,available_from,available_to\n0,\xff,1\n")
    with pytest.raises(P.TraceError, match=r"not a readable CSV"):
        P.read_availability_trace(str(tmp_path / "b.csv"), 3)


MUTATIONS = ["overlap", "negative", "from_ge_to", "unknown_column", "missing_column",
             "non_numeric", "outside", "empty"]


@SETTINGS
@given(case=traces(), mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_every_broken_generated_trace_raises_the_named_error(tmp_path, case, mutation, data):
    n, windows = case
    rows = [[str(c), repr(a), repr(b)] for c, a, b in windows] or [["0", "0.0", "1.0"]]
    header = list(HEADER)
    k = data.draw(st.integers(0, len(rows) - 1))
    c, a, b = int(rows[k][0]), float(rows[k][1]), float(rows[k][2])
    if mutation == "overlap":
        rows.append([str(c), repr(a), repr(b + 1.0)])
    elif mutation == "negative":
        rows[k][1] = repr(-data.draw(st.floats(1e-6, 1e9)))
    elif mutation == "from_ge_to":
        rows[k][2] = repr(a - data.draw(st.floats(0, 1e6)))
    elif mutation == "unknown_column":
        header[data.draw(st.integers(0, 2))] = data.draw(
            st.sampled_from(["clients", "from", "to", "start", "available", "id"]))
    elif mutation == "missing_column":
        drop = data.draw(st.integers(0, 2))
        header.pop(drop)
        rows = [r[:drop] + r[drop + 1:] for r in rows]
    elif mutation == "non_numeric":
        rows[k][data.draw(st.integers(0, 2))] = data.draw(
            st.sampled_from(["x", "", "1,5", "nan", "--1", "1e", "one"]))
    elif mutation == "outside":
        rows[k][0] = str(data.draw(st.sampled_from([n, n + 7, -1])))
    else:
        rows = []
    path = _write(tmp_path / "g.csv", header, rows)
    if mutation == "empty" and data.draw(st.booleans()):
        Path(path).write_text("")
    with pytest.raises(P.TraceError) as err:
        P.read_availability_trace(path, n)
    assert str(err.value).startswith(path)


@SETTINGS
@given(text=st.text(st.characters(codec="utf-8"), max_size=200))
def test_any_text_parses_or_raises_the_named_error(tmp_path, text):
    path = tmp_path / "any.csv"
    path.write_text(text, encoding="utf-8")
    try:
        av = P.read_availability_trace(str(path), 4)
    except P.TraceError:
        return
    assert isinstance(av, Windows) and len(av.client) >= 1


# -- device-capacity CSVs ------------------------------------------------------------------------
DEVICE_FIELDS = ["slowdown", "uplink", "downlink", "latency"]


@st.composite
def device_tables(draw: st.DrawFn) -> tuple[int, list[str], dict[int, list[float]]]:
    n = draw(st.integers(1, 10))
    cols = draw(st.lists(st.sampled_from(DEVICE_FIELDS), min_size=1, unique=True))
    clients = draw(st.lists(st.integers(0, n - 1), min_size=1, unique=True))
    positive = st.floats(1e-3, 1e9, allow_nan=False)
    table = {c: [draw(st.floats(0, 10, allow_nan=False) if col == "latency" else positive)
                 for col in cols] for c in clients}
    return n, cols, table


@SETTINGS
@given(case=device_tables())
def test_a_valid_device_table_overrides_exactly_the_clients_it_names(tmp_path, case):
    n, cols, table = case
    path = _write(tmp_path / "d.csv", ["client", *cols],
                  [[str(c), *map(repr, v)] for c, v in table.items()])
    plats = ["android"] * (n // 2) + ["ios"] * (n - n // 2)
    drawn = P.sample_capacities({}, plats, COSTS, EVAL, seed=9)
    caps = P.sample_capacities({"devices": path}, plats, COSTS, EVAL, seed=9)
    for i in range(n):
        for col in DEVICE_FIELDS:
            want = (table[i][cols.index(col)] if i in table and col in cols
                    else getattr(drawn, col)[i])
            assert getattr(caps, col)[i] == want, (i, col)


def test_fedscale_device_fields_are_converted(tmp_path):
    path = _write(tmp_path / "fedscale.csv", ["client", "computation", "communication"],
                  [["0", "50", "1000"], ["1", "20", "8000"]])
    caps = P.sample_capacities({"devices": path}, ["android", "ios", "ios"], COSTS, EVAL, 0)
    # 3 × 50 ms per sample = 0.15 s per training example; this machine's android: 2 ms
    assert caps.slowdown[0] == pytest.approx(3 * 0.050 / COSTS["android"])
    assert caps.slowdown[1] == pytest.approx(3 * 0.020 / COSTS["ios"])
    assert caps.fit_seconds([0], [10], 1, 0.0, 0.0)[0] == pytest.approx(
        2 * caps.latency[0] + 10 * 0.150)
    assert (caps.uplink[0], caps.downlink[1]) == (128_000.0, 1_024_000.0)
    split = _write(tmp_path / "split.csv", ["client", "ul_kbps", "dl_kbps"], [["2", "10", "20"]])
    caps = P.sample_capacities({"devices": split}, ["android", "ios", "ios"], COSTS, EVAL, 0)
    assert (caps.uplink[2], caps.downlink[2]) == (1280.0, 2560.0)


@pytest.mark.parametrize("header, rows, match", [
    (["client", "slowdown", "computation"], [["0", "1", "2"]],
     r"columns 'slowdown' and 'computation' say the same thing"),
    (["client", "uplnk"], [["0", "1"]], r"unknown column 'uplnk'; did you mean 'uplink'\?"),
    (["slowdown"], [["1"]], r"missing column\(s\) client"),
    (["client"], [["0"]], r"no capacity column besides client"),
    (["client", "uplink"], [["0", "0"]], r"row 2: uplink 0 must be > 0"),
    (["client", "latency"], [["0", "-1"]], r"row 2: latency -1 must be >= 0"),
    (["client", "slowdown"], [["0", "2"], ["0", "3"]], r"row 3: client 0 appears twice"),
    (["client", "slowdown"], [["5", "2"]], r"row 2: client '5' is not a client"),
    (["client", "slowdown"], [["0", "fast"]], r"row 2: slowdown 'fast' is not a number"),
])
def test_a_broken_device_table_is_refused(tmp_path, header, rows, match):
    path = _write(tmp_path / "dev.csv", header, rows)
    with pytest.raises(P.TraceError, match=match):
        P.read_devices(path, 3)
    with pytest.raises(P.TraceError, match=match):
        SimulationConfig(android=3, profiles={"devices": path})


@SETTINGS
@given(case=device_tables(), mutation=st.sampled_from(
    ["non_numeric", "non_positive", "outside", "duplicate", "unknown", "empty"]),
       data=st.data())
def test_every_broken_generated_device_table_raises_the_named_error(tmp_path, case, mutation,
                                                                    data):
    n, cols, table = case
    header = ["client", *cols]
    rows = [[str(c), *map(repr, v)] for c, v in table.items()]
    k = data.draw(st.integers(0, len(rows) - 1))
    j = data.draw(st.integers(1, len(cols)))
    if mutation == "non_numeric":
        rows[k][j] = data.draw(st.sampled_from(["", "x", "1;2", "nan", "inf"]))
    elif mutation == "non_positive":
        rows[k][j] = "-1" if cols[j - 1] == "latency" else data.draw(
            st.sampled_from(["0", "-0.5"]))
    elif mutation == "outside":
        rows[k][0] = str(n)
    elif mutation == "duplicate":
        rows.append(list(rows[k]))
    elif mutation == "unknown":
        header[j] = header[j] + "_x"
    else:
        rows = []
    path = _write(tmp_path / "g.csv", header, rows)
    with pytest.raises(P.TraceError) as err:
        P.read_devices(path, n)
    assert str(err.value).startswith(path)


def test_trace_errors_are_input_errors():
    assert issubclass(P.TraceError, xflwb.InputError)
    assert issubclass(P.TraceError, ValueError)
