"""``python -m lafs ...`` = the ``lafs`` console script (the experiment runner starts its runs this way)."""

import sys

from .cli import main

sys.exit(main())
