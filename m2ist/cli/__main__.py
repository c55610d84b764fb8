"""``python -m m2ist.cli`` (e.g. under ``accelerate launch -m m2ist.cli train ...``)."""

import sys

from .main import main

sys.exit(main())
