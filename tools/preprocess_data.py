#!/usr/bin/env python3
"""Tokenise corpora into Megatron indexed datasets. See `--help` and the README."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_danube.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
