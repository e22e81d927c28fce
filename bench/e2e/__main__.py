"""`python -m bench.e2e`: see `bench.e2e.sweep`."""

import sys

from bench.e2e import sweep

sys.exit(sweep.main())
