#!/usr/bin/env python3
"""Same as the `danube-benchmark-preprocess` command."""

import sys

from megatron_danube.cli.benchmark_preprocess import main

if __name__ == "__main__":
    sys.exit(main())
