"""lm-eval's own command line with the `danube` model registered.

lm-eval finds a model class only once its module is imported (it has no plugin discovery), so
`lm_eval --model danube` alone does not know it; this does, taking lm-eval's arguments:

    python -m megatron_danube.eval.harness --model danube \
        --model_args load=RUN_OR_CHECKPOINT,batch_size=8 --tasks hellaswag
    torchrun --nproc-per-node 4 -m megatron_danube.eval.harness --model danube \
        --model_args load=RUN,parallel.tensor_parallel=2 --tasks arc_challenge
"""

from megatron_danube.eval import tasks


def main() -> None:
    tasks.go_offline()  # before lm-eval imports `datasets`
    from lm_eval.__main__ import cli_evaluate

    import megatron_danube.eval.lm  # noqa: F401  (registers `danube`)

    cli_evaluate()


if __name__ == "__main__":
    main()
