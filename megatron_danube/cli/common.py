"""The commands' shared runner, re-exported for the cli modules (it lives in
`megatron_danube/commands.py`, below every command, so commands outside cli, such as
`python -m megatron_danube.eval`, share it too)."""

from megatron_danube.commands import (  # noqa: F401  (re-exports)
    QUIET_RANK_EXIT_DELAY_S,
    cpu_only_process,
    fail,
    launched_rank,
    report,
    run_command,
    summary,
    weights_only_loads,
)
