"""Evaluation with lm-eval (the `[eval]` extra): the Megatron model as lm-eval's `danube`
model at any TP/PP/DP layout, the project's offline demo tasks, the `danube-eval` command,
and the scoring of tasks during training.

    scoring.py     token rows through megatron's forward-only schedule; exact vocab-parallel
                   log-probabilities and argmax; data-parallel split and gather
    generation.py  greedy generation on the scorer (no KV cache)
    lm.py          `DanubeLM`, lm-eval's TemplateLM, registered as `danube`
    loading.py     a checkpoint checked, then loaded forward-only with the trainer's build
    tasks.py       tasks found and their data loaded offline, or a one-line error
    demo_tasks.py  the pydoc multiple-choice and perplexity tasks, written to a folder
    results.py     simple_evaluate, lm-eval's table, the JSON, flat `eval/<task>/<metric>`
    in_loop.py     the trainer's task evaluation hook
    command.py     danube-eval (`python -m megatron_danube.eval`)
    harness.py     lm-eval's own command line with `danube` registered
"""
