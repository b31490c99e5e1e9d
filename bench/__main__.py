"""``python -m bench [...]`` from the repository root: ``fastppo bench [...]`` with results written to
``bench/results/`` (the committed results) unless ``--output`` says otherwise."""

import sys
from pathlib import Path

from fastppo.bench.run import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m bench", default_output=str(Path(__file__).parent / "results")))
