#!/usr/bin/env python3
"""Tokenise corpora into Megatron indexed datasets (= `danube-preprocess`). See `--help`."""

import sys

from megatron_danube.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
