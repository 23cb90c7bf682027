"""Entry point of ``python -m diffa2.data.synth``: builds the corpus from the command line (see cli.py)."""

import sys

from diffa2.data.synth.cli import main

sys.exit(main())
