"""``python -m calibbench.report DIR``."""

import sys

from calibbench.report.cli import main

sys.exit(main())
