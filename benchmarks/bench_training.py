"""Time per training iteration: cpusparse VR-PGE against dense baselines (issue 5).

A thin script over :mod:`cpusparse.bench` (the same code as ``cpusparse bench``):

    python benchmarks/bench_training.py [--quick] [--threads N] [--out DIR] ...

See ``cpusparse bench --help`` for every option.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpusparse.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
