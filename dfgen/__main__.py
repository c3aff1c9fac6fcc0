"""`python -m dfgen` runs the `dfgen` command."""

import sys

from .tools.cli import main

sys.exit(main())
