#!/usr/bin/env python3
"""Compare an HF model directory with a megatron_danube checkpoint on the same prompts."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_danube.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
