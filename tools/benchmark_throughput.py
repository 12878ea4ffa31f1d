#!/usr/bin/env python3
"""Same as the `danube-benchmark-throughput` command."""

import sys

from megatron_danube.cli.benchmark_throughput import main

if __name__ == "__main__":
    sys.exit(main())
