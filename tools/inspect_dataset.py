#!/usr/bin/env python3
"""Same as the `danube-inspect-dataset` command."""

import sys

from megatron_danube.cli.inspect_dataset import main

if __name__ == "__main__":
    sys.exit(main())
