"""Allreduce benchmark: `mpirun -n 2 python bench/allreduce.py -b 8 -e 256M -f 4 --json out.json`.

Same as `hpc-train bench allreduce`; see hpc_train/benchmarks/allreduce.py.
"""

import sys

from hpc_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "allreduce", *sys.argv[1:]]))
