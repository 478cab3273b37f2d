"""``python -m kcm_cuda.evaluation`` = ``kcm-eval``."""

import sys

from kcm_cuda.evaluation.cli import main

sys.exit(main())
