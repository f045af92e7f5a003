"""``python -m protperf``: the ``protperf`` command (also what ``torchrun -m protperf`` runs)."""

import sys

from protperf.cli import main

sys.exit(main())
