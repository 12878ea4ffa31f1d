#!/usr/bin/env python3
"""Same as the `danube-benchmark-chat-data` command."""

import sys

from megatron_danube.cli.benchmark_chat_data import main

if __name__ == "__main__":
    sys.exit(main())
