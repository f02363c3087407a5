"""``python -m bench``: run the budget benchmarks on the backends named by the environment."""

import sys

from bench.runner import main

sys.exit(main())
