#!/usr/bin/env python3
"""Same as the `danube-merge-datasets` command."""

import sys

from megatron_danube.cli.merge_datasets import main

if __name__ == "__main__":
    sys.exit(main())
