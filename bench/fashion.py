"""Fashion-MNIST's best recipe on this machine: test accuracy mean ± std over seeds, wall time.

    python bench/fashion.py                       # fashion-mnist-best, seeds 0 1 2
    python bench/fashion.py train.epochs=10 --seeds 0

Each seed is a full `cvrecipe run` (data → train → evaluate with the recipe's TTA → report);
wall time counts all of it. Same machinery as bench/seeds.py, with this recipe as the default.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[1:1] = ["fashion-mnist-best"]  # the recipe; everything else is seeds.py's arguments
    main()
