"""`python -m hpc_train ...` is `hpc-train ...` (where the console script is not on PATH)."""

import sys

from .cli import main

sys.exit(main())
