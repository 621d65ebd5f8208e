"""``python -m pipelines.cli`` = the ``raydistill`` console script."""

import sys

from pipelines.cli import main

sys.exit(main())
