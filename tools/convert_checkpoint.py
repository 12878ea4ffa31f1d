#!/usr/bin/env python3
"""Convert checkpoints between megatron_danube and Hugging Face (= `danube-convert`)."""

from megatron_danube.cli.convert import main

if __name__ == "__main__":
    main()
