#!/usr/bin/env python3
"""Compare an HF export with its megatron checkpoint by logits (= `danube-compare`)."""

from megatron_danube.cli.compare import main

if __name__ == "__main__":
    main()
