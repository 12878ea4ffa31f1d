"""danube-config-reference: print the configuration reference (the README's table)."""

from __future__ import annotations

from megatron_danube.cli.common import report


def main(argv=None) -> int:
    from megatron_danube.config.reference import markdown

    report(markdown())
    return 0
