"""``python -m fastppo.bench``: the same as ``fastppo bench``."""

import sys

from fastppo.bench.run import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m fastppo.bench"))
