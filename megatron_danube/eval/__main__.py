"""`python -m megatron_danube.eval ...` is `danube-eval ...` (eval/command.py)."""

from megatron_danube.eval.command import main

if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
