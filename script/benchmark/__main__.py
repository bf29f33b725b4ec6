"""`python -m benchmark` (script/bench): the command line."""

import sys

from .cli import main

sys.exit(main())
