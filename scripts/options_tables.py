"""Write the docs' option tables from the one declaration of each option set.

    python scripts/options_tables.py            # rewrite the tables in place
    python scripts/options_tables.py --check    # exit 1 if any is stale (the tests do this)

A table sits between ``<!-- options:NAME -->`` and ``<!-- /options -->`` in any of
``PAGES`` (docs/options.md holds the front-ends' sets; a feature's page holds the set of
its option, e.g. ``DP`` in docs/privacy.md; README.md is processed too so a marker added
there is never left stale); NAME is a key of :func:`sets`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the pages whose marked tables are generated: the README and every page of docs/
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
_BLOCK = re.compile(r"(<!-- options:(\w+) -->\n)(.*?)(<!-- /options -->)", re.S)


def sets() -> dict[str, type]:
    from xflwb.devices.device import DeviceOptions
    from xflwb.devices.fleet import FleetOptions
    from xflwb.federation.compression import Compression
    from xflwb.federation.dp import DP
    from xflwb.federation.fedbuff import FedBuff
    from xflwb.federation.profiles import DeviceProfiles
    from xflwb.server.config import BackendOptions, SessionConfig, TLSOptions
    from xflwb.simulation.config import SimulationConfig
    from xflwb.simulation.secagg import SecAgg

    return {c.__name__: c for c in (SessionConfig, SimulationConfig, BackendOptions,
                                    TLSOptions, FleetOptions, DeviceOptions, DP, SecAgg,
                                    FedBuff, Compression, DeviceProfiles)}


def render(text: str, page: str = "README.md") -> str:
    """``text`` (of ``page``, named in errors) with every marked table regenerated."""
    from xflwb._options import markdown_table

    known = sets()

    def table(m: re.Match[str]) -> str:
        if m.group(2) not in known:
            raise KeyError(f"{page} marks an unknown option set {m.group(2)!r}; known: "
                           f"{sorted(known)}")
        return m.group(1) + markdown_table(known[m.group(2)]) + "\n" + m.group(4)

    return _BLOCK.sub(table, text)


def main(argv: list[str]) -> int:
    stale = []
    for path in PAGES:
        if not path.exists():
            continue
        text = path.read_text()
        fresh = render(text, str(path.relative_to(ROOT)))
        if fresh == text:
            continue
        if "--check" in argv:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(fresh)
    if stale:
        print(f"option tables are stale in {', '.join(stale)}: run python "
              "scripts/options_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
