"""`python -m altermoma ...`, the form torchrun launches: `torchrun --nproc_per_node=N -m altermoma prune ...`."""

import sys

from altermoma.cli import main

sys.exit(main())
