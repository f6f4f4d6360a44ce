"""``python -m zimage_core ...``: the ``zimage`` command line."""

import sys

from .cli import main

sys.exit(main())
