"""``python -m cleansight_analysis.cli``: the ``cleansight`` command."""

import sys

from . import main

sys.exit(main())
