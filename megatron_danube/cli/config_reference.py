"""danube-config-reference: print the configuration reference (the README's table)."""

from __future__ import annotations

import argparse

from megatron_danube.cli.common import report, summary


def main(argv=None) -> int:
    argparse.ArgumentParser(
        prog="danube-config-reference", description=summary(__doc__)
    ).parse_args(argv)
    from megatron_danube.config.reference import markdown

    report(markdown())
    return 0
