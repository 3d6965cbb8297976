"""``python -m pathvl.cli`` (what ``torchrun -m pathvl.cli`` runs)."""

import sys

from pathvl.cli import main

sys.exit(main())
