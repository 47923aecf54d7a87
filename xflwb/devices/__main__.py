"""``python -m xflwb.devices``: one virtual phone (a fleet starts one per device)."""

import sys

from xflwb.devices.entry import main

sys.exit(main())
