"""``python -m batch WORKFLOW IMAGES OUT [options]`` (see batch/cli.py, or ``--help``)."""

import sys

from batch.cli import main

sys.exit(main())
