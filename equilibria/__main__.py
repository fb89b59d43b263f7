"""``python -m equilibria ...`` runs the ``equilibria`` command line (also under torchrun -m)."""

import sys

from equilibria.zoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
