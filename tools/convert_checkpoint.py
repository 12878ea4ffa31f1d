#!/usr/bin/env python3
"""Convert megatron_danube checkpoints to and from Hugging Face Mistral (see --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_danube.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
