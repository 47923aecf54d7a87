"""One colour per platform everywhere: dashboard, ``xflwb.report``, the demo's plots.

Android green and Apple blue (the platforms' own brand colours), a neutral grey for the
aggregate ("all"), and Keras red for the Keras reference in runtime comparisons.
"""

from __future__ import annotations

PLATFORM_COLORS: dict[str, str] = {
    "android": "#3ddc84",
    "ios": "#147efb",
    "all": "#444444",
    "keras": "#d00000",
}

#: Axis labels shared by the dashboard, the report and the demo plot.
ROUND_LABEL = "round"
ACCURACY_LABEL = "accuracy on devices' held-out data"
LOSS_LABEL = "loss on devices' held-out data"


def color(platform: str) -> str | None:
    """The platform's colour (None: let matplotlib choose, for names we do not know)."""
    return PLATFORM_COLORS.get(platform)
