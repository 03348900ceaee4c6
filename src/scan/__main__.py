"""`python -m scan ...` and, for several processes, `torchrun --nproc-per-node=N -m scan run ...`.

Under torchrun only rank 0 prints results: the other ranks' standard output is dropped (their
errors still reach standard error, and torchrun names the rank that failed).
"""
import os
import sys

from scan.cli import main

if __name__ == "__main__":
    if os.environ.get("RANK", "0").strip() not in ("", "0"):   # a malformed RANK is reported by the command
        sys.stdout = open(os.devnull, "w")
    sys.exit(main())
