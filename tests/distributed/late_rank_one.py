"""`python -m late_rank_one ARGS`: `moeforge ARGS`, with rank 1 starting 3 s after rank 0, as a rank
still importing torch on a loaded machine does (the user-error test launches it under torchrun)."""

import os
import sys
import time

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        time.sleep(3)
    from moeforge.cli import main

    sys.exit(main())
