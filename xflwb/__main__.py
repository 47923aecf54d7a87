"""``python -m xflwb`` is the ``xflwb`` command."""

import sys

from xflwb.cli import main

sys.exit(main())
