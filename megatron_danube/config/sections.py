"""The run configuration: one dataclass per YAML section, a docstring under every field.

Nothing here imports the rest of the package, so models, runtime, data and training can all
depend on it. The optimizer section is megatron-core's own `OptimizerConfig` with the Danube
recipe's defaults (AdamW 0.9/0.95, weight decay 0.1, clip 1.0): its fields are megatron's.
The field docstrings are the configuration reference (`danube-config-reference` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from megatron.core.optimizer import OptimizerConfig

SpecChoice = Literal["auto", "te", "local"]
DeviceChoice = Literal["auto", "cuda", "cpu"]
DtypeChoice = Literal["float32", "bfloat16", "float16"]
Fp8Choice = Literal["delayed", "tensorwise", "mxfp8"]
TokenizerTypeChoice = Literal[
    "sentencepiece",
    "huggingface",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
]


@dataclass
class ModelSection:
    """Which model to build."""

    preset: str = "danube-1.8b"
    """Registered preset: `danube-1.8b`, `danube2-1.8b`, `danube-tiny` or `danube-test`."""
    spec: SpecChoice = "auto"
    """`te` (Transformer Engine), `local` (pure PyTorch), `auto`: TE on a GPU where installed."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Preset fields to change, e.g. `{sliding_window: null}`."""


@dataclass
class ParallelLayout:
    """TP x CP x PP (x virtual PP) x DP; DP is what the world size leaves."""

    tensor_parallel: int = 1
    """Tensor-parallel ranks (within a node; must divide the head and KV-head counts)."""
    pipeline_parallel: int = 1
    """Pipeline stages."""
    virtual_pipeline: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    context_parallel: int = 1
    """Context-parallel ranks (TE spec only)."""
    sequence_parallel: bool = False
    """Shard norm and dropout activations over the TP ranks (needs TP > 1)."""

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel


@dataclass
class PrecisionConfig:
    """Parameter and matmul precision."""

    params_dtype: DtypeChoice = "float32"
    """`bfloat16` on GPU (fp32 master weights in the optimizer), `float16` (loss scaling)."""
    fp8: Optional[Fp8Choice] = None
    """FP8 recipe for the linear layers (TE spec only; `mxfp8` needs Blackwell)."""
    fp8_amax_history_len: int = 1024
    """Amax history length of the `delayed` recipe."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """How the `delayed` recipe reduces its amax history."""


@dataclass
class RecomputeConfig:
    """Activation recomputation."""

    granularity: Optional[Literal["selective", "full"]] = None
    """`selective` (attention core, cheap) or `full` (whole layers, see `method`)."""
    method: Literal["uniform", "block"] = "uniform"
    """How `full` picks the layers it recomputes."""
    num_layers: int = 1
    """Layers per recomputed group (`uniform`) or recomputed per stage (`block`)."""


@dataclass
class DataSection:
    """Where the tokens come from."""

    blend: List[Any] = field(default_factory=list)
    """`[prefix]` or Megatron-LM's `[w1, prefix1, w2, prefix2, ...]`."""
    split: str = "98,2,0"
    """Train/valid/test split of each dataset, in parts."""
    tokenizer: str = "mistral-v1"
    """SentencePiece `.model`, an HF tokenizer directory, or `mistral-v1`."""
    tokenizer_type: Optional[TokenizerTypeChoice] = None
    """Tokenizer kind; inferred from `tokenizer` when null."""
    seed: int = 1234
    """Seed of the sample order."""
    demo_corpus_prefix: Optional[str] = None
    """Build the pydoc demo corpus at this prefix if it is missing."""


@dataclass
class StageSection:
    """From `start_tokens` consumed tokens on: this sequence length and (optionally) blend."""

    start_tokens: int = 0
    """Consumed tokens at which the stage starts (a multiple of the global batch)."""
    seq_length: int = 2048
    """Sequence length of the stage."""
    blend: Optional[List[Any]] = None
    """The stage's blend; null keeps `data.blend`."""


@dataclass
class TrainSection:
    """How long and how wide."""

    train_tokens: int = 1_048_576
    """Total tokens (a multiple of the global batch); fine-tuning runs `chat.epochs` instead."""
    global_batch_tokens: int = 4096
    """Tokens per step, constant across stages."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per rank."""
    seed: int = 1234
    """Seed of the initialisation and dropout."""
    device: DeviceChoice = "auto"
    """`cuda` (nccl) or `cpu` (gloo); `auto` picks CUDA where visible."""
    max_bad_steps: int = 5
    """Skipped steps in a row (non-finite loss or gradients, or a gradient norm over
    `optim.grad_norm_skip_threshold` on megatron-core 0.18+) before the run saves and stops
    (exit 1)."""
    exit_after_steps: Optional[int] = None
    """Stop, with a checkpoint, after this many steps of this process."""
    distributed_timeout_minutes: float = 30.0
    """How long a collective or barrier waits for the other ranks before the run fails: a rank
    lost with its node ends the job after this long instead of hanging it. Covers rank 0
    encoding chat data while the others wait, so keep it above that."""
    rendezvous_timeout_s: float = 300.0
    """How long the ranks wait at start to reach each other at MASTER_ADDR:MASTER_PORT before
    failing with a message naming what did not arrive."""


@dataclass
class OptimSection(OptimizerConfig):
    """megatron-core's OptimizerConfig (any of its fields) with the Danube recipe's defaults.

    `bf16`, `fp16` and `params_dtype` follow `precision.params_dtype`.
    """

    lr: Optional[float] = 3e-4
    """Peak learning rate."""
    min_lr: Optional[float] = None
    """Floor of the cosine decay; null: 10% of `lr` (Llama-2)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW)."""
    adam_beta2: float = 0.95
    """Adam's second-moment decay."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over the data-parallel ranks."""
    initial_loss_scale: float = 2.0**16
    """fp16 only: the starting loss scale."""
    warmup_tokens: int = 0
    """Linear warm-up length, in tokens (the schedule's unit is tokens)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""


@dataclass
class CheckpointSection:
    """When and where checkpoints are written and read."""

    save_interval: Optional[int] = None
    """Steps between saves; null: only at the end and on signals."""
    keep_last: int = 3
    """Checkpoints kept; older ones are removed after a newer one verified."""
    async_save: bool = False
    """Write checkpoints in the background."""
    load: Optional[str] = None
    """A checkpoint to start from when the run has none of its own."""
    load_optimizer: bool = True
    """False: weights only (e.g. from converted HF weights); fine-tuning always starts so."""
    verify: bool = True
    """Check every checkpoint's manifest (sizes and checksums) before it is resumed."""
    allow_changes: List[str] = field(default_factory=list)
    """Fields a resume may change on purpose, e.g. `[train.global_batch_tokens]`."""


@dataclass
class ChatSection:
    """Chat fine-tuning data (`job: sft`): JSONL conversations, template, packing."""

    train: List[str] = field(default_factory=list)
    """JSONL (.gz, .zst) or save_to_disk dataset dirs: `messages` or `prompt` records (README)."""
    valid: List[str] = field(default_factory=list)
    """Held-out files or saved datasets, as `train`; empty: `valid_fraction` of `train`."""
    valid_fraction: float = 0.0
    """Share of `train` samples held out when `valid` is empty (0: no validation)."""
    template: str = "danube"
    """Chat template: `danube` (`<|prompt|>..</s><|answer|>..</s>`), a `.jinja` file or text."""
    seq_length: int = 2048
    """Tokens per packed row; longer conversations are cut (DPO: each side to half of it)."""
    truncation: Literal["left", "right"] = "left"
    """Which end of a too-long conversation is cut (left keeps the last answer)."""
    packing: Literal["bfd", "greedy", "none"] = "bfd"
    """Several conversations per row, attention isolated per conversation: `bfd` best-fit
    decreasing (rows nearly full; the packs shuffled each epoch), `greedy` in shuffled order;
    `none`: one conversation (DPO: one pair) per row."""
    epochs: int = 1
    """Passes over the training data (each shuffled with `data.seed` + epoch)."""
    workers: Optional[int] = None
    """Processes that encode the chat data (once per node, cached); null: the cores this
    process may use."""
    demo_dir: Optional[str] = None
    """Build the pydoc chat demo's train.jsonl/valid.jsonl here if they are missing."""


@dataclass
class DpoSection:
    """Direct preference optimisation (`job: dpo`): pairs in `chat`, the start in `checkpoint`."""

    beta: float = 0.2
    """Strength of the pull towards the reference model (Danube's DPO stages used 0.2)."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """`sigmoid` (DPO), `ipo` (length-normalised, as TRL) or `hinge` (SLiC)."""
    label_smoothing: float = 0.0
    """sigmoid only: the assumed share of flipped labels (conservative DPO; TRL 1.16 ignores it)."""
    sft_weight: float = 0.0
    """Weight of an added NLL term on the chosen completion (mean per token, per pair)."""
    reference: Literal["precomputed", "adapters_off"] = "precomputed"
    """`precomputed`: the start model's log-probabilities, computed once before the first step
    into `RUN_DIR/reference_logps.npz`; `adapters_off` (with `peft.method: lora`): the same
    model with its adapters switched off, one extra forward pass per step and no file (TRL's
    reference with a `peft_config`)."""


@dataclass
class PeftSection:
    """Parameter-efficient fine-tuning (`job: sft`, `job: dpo`): LoRA adapters, base frozen."""

    method: Optional[Literal["lora"]] = None
    """`lora`: train adapters on the projections only; null: train every weight."""
    rank: int = 8
    """LoRA rank r (the Danube report's first DPO stage used 4)."""
    alpha: float = 16.0
    """LoRA alpha; the adapters' output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    target_modules: List[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    )
    """megatron layers (`linear_qkv`, ...) or HF projections (`q_proj`, `gate_proj`, ...)."""
    exclude_modules: List[str] = field(default_factory=list)
    """Layers or projections taken out of `target_modules`."""
    base: Optional[str] = None
    """When `checkpoint.load` is an HF PEFT adapter directory: the base model it applies to
    (an HF directory or a checkpoint); null: the adapter's own `base_model_name_or_path`."""


@dataclass
class LoggingSection:
    """What is recorded, and how often."""

    log_interval: int = 10
    """Steps between metric records."""
    eval_interval: int = 100
    """Steps between validations; 0: only at the end."""
    eval_iters: int = 10
    """Global batches per validation (pretraining; fine-tuning validates on all held-out data)."""
    eval_at_start: bool = False
    """Also validate before the first step (the starting weights' held-out loss)."""
    tensorboard: bool = True
    """Also write TensorBoard events."""
    peak_tflops: Optional[float] = None
    """MFU denominator; null: 989 (H100 bf16 dense) on GPU, none on the CPU."""


@dataclass
class EvalSection:
    """lm-eval tasks scored during training at its layout (needs the `[eval]` extra)."""

    tasks: List[str] = field(default_factory=list)
    """lm-eval task names, e.g. `[danube_demo_mc, hellaswag]`; empty: no task scoring."""
    interval: int = 0
    """Steps between task scorings (as `logging.eval_interval`); 0: only at the end."""
    limit: Optional[int] = None
    """Documents per task; null: all of them."""
    num_fewshot: Optional[int] = None
    """Few-shot examples; null: each task's own default."""
    batch_size: int = 8
    """Rows per micro-batch per data-parallel replica."""
    include_paths: List[str] = field(default_factory=list)
    """Folders of further task YAMLs (the demo tasks are written to RUN_DIR/eval-tasks)."""


@dataclass
class RunConfig:
    """One run: pretraining (`danube-pretrain`) or chat fine-tuning (`danube-finetune`)."""

    job: str = "pretrain"
    """A registered job: `pretrain` (token stages over corpora), `sft` (chat fine-tuning),
    `dpo` (preferences), or one a plugin registers (training/jobs/registry.py)."""
    run_dir: str = "runs/default"
    """Checkpoints, metrics.jsonl and tensorboard/ go here (and logs/ under the SLURM scripts)."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model preset and layer implementation."""
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    """The parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Parameter precision and FP8."""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    """Activation recomputation."""
    data: DataSection = field(default_factory=DataSection)
    """Corpora and tokenizer."""
    stages: List[StageSection] = field(default_factory=lambda: [StageSection()])
    """The stage schedule: sequence length and blend by consumed tokens."""
    chat: ChatSection = field(default_factory=ChatSection)
    """Chat fine-tuning data (`job: sft` conversations, `job: dpo` preference pairs)."""
    dpo: DpoSection = field(default_factory=DpoSection)
    """DPO loss settings (`job: dpo`)."""
    peft: PeftSection = field(default_factory=PeftSection)
    """LoRA adapters for the fine-tuning jobs (`job: sft`, `job: dpo`)."""
    train: TrainSection = field(default_factory=TrainSection)
    """Length, batch and device."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer and LR schedule."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Saving, verifying and loading checkpoints."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics and validation."""
    eval: EvalSection = field(default_factory=EvalSection)
    """lm-eval tasks scored during training."""
