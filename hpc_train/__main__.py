"""`python -m hpc_train ...` is `hpc-train ...` (where the console script is not on PATH)."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the module (as tools that import every module do) runs nothing
    sys.exit(main())
