"""Train CLIP / SigLIP with Concept-Aware Batch Sampling: ``composer train.py yamls/<recipe>.yaml``.

Extra ``key=value`` arguments override the recipe (``optimizer.lr=1e-4 max_duration=10ba``).
"""

import sys

from cabs_streaming.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
