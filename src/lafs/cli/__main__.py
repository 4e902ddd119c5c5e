"""``python -m lafs.cli ...`` (and ``torchrun -m lafs.cli train ...``) = the ``lafs`` console script."""

import sys

from . import main

sys.exit(main())
