"""Run megatron-core 0.16.1 to 0.19.x on a machine without CUDA (tests, the CPU demo).

megatron-core assumes CUDA in a few dozen places. Everything needed to run it on the CPU with
the gloo backend lives in this module, and `apply()` is only ever called when the run's device
is the CPU: the GPU path never imports a patched function. What a release needs beyond 0.16's
set is keyed on `compat.FEATURES` (the one place that knows versions).

What is patched, and why (each was hit by a real code path):

* tensor factories (`torch.zeros/ones/empty/full/tensor/arange/...`) called with
  `device="cuda"` or an integer device (pipeline schedules' token counters, clip_grads,
  optimizer scalars, `get_default_causal_mask`): the CUDA device is rewritten to the CPU.
  This is scoped: each loaded `megatron.core.*` module's global `torch` is replaced by a proxy
  of the torch module whose factories redirect; torch itself is untouched, so other libraries
  in the process (transformers builds RoPE buffers with these factories) are not affected.
* `torch.cuda.current_device()` is used as a device in rotary embeddings, p2p buffers and
  more: it returns `torch.device("cpu")`.
* `torch.cuda.synchronize()` (p2p, checkpoint writers): a no-op.
* the CUDA RNG (megatron's tensor-parallel RNG tracker): mapped onto the CPU generator, so
  `model_parallel_cuda_manual_seed` and `get_cuda_rng_tracker().fork()` work unchanged.
* `Tensor.cuda()` (distributed-optimizer checkpoint save): returns the tensor itself.
* `Tensor.type()` without arguments: megatron asserts `grad.type() == "torch.cuda.FloatTensor"`
  in clip_grads and the distributed optimizer; on the CPU the name gains the `cuda.` prefix.
* `torch.cuda.current_stream()` (0.19+, `FEATURES.grad_sync_uses_cuda_stream`): the DDP
  gradient sync (`param_and_grad_buffer.start_grad_sync`) takes the current stream on every
  call, to wait on events of CUDA-graph replays, and fails without a driver. Megatron's modules
  see a `torch.cuda` whose current stream is a no-op CPU stream (scoped like the factories);
  torch.cuda itself is untouched. Nothing runs asynchronously on the CPU, so waiting is moot.

The PP=2 + virtual-pipeline wrong-loss trap noted there is *not* CPU specific and is handled
where the TransformerConfig is made (`models/config_builder.py`), not here.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

import torch

_APPLIED = False

_FACTORIES = (
    "zeros",
    "ones",
    "empty",
    "full",
    "tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "as_tensor",
    "empty_strided",
)
_FACTORIES_LIKE = ("zeros_like", "ones_like", "empty_like", "full_like")


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


def _cpu_tensor_type(original):
    @functools.wraps(original)
    def tensor_type(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and self.device.type == "cpu":
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    return tensor_type


class _CpuStream:
    """What megatron does with a current stream during the grad sync, as no-ops."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _CudaProxy(types.ModuleType):
    """`torch.cuda` as megatron's modules see it on the CPU: a no-op current stream."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_stream = lambda *args, **kwargs: _CpuStream()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchProxy(types.ModuleType):
    """`torch` as megatron's modules see it on the CPU: factories map CUDA devices to CPU."""

    def __init__(self, cpu_streams: bool = False):
        super().__init__("torch")
        for name in _FACTORIES + _FACTORIES_LIKE:
            setattr(self, name, _redirect_device(getattr(torch, name)))
        if cpu_streams:
            self.cuda = _CudaProxy()

    def __getattr__(self, name):
        return getattr(torch, name)


_MEGATRON_MODULES = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
)


def _proxy_megatron_modules(proxy) -> None:
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = proxy


def apply() -> None:
    """Patch torch and megatron-core for a CPU-only process. Idempotent.

    Refuses to run where CUDA is available: the GPU path must never see these patches.
    """
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        from megatron_danube.errors import DanubeConfigError

        raise DanubeConfigError(
            "train.device=cpu on a machine with a CUDA GPU: megatron's CPU patches are never "
            "applied next to a GPU; use train.device=auto or cuda"
        )

    from megatron_danube.compat import FEATURES

    _proxy_megatron_modules(_TorchProxy(cpu_streams=FEATURES.grad_sync_uses_cuda_stream))
    # Global, but only meaningful for megatron's CUDA-type assertions (see the module doc).
    torch.Tensor.type = _cpu_tensor_type(torch.Tensor.type)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None

    # megatron's RNG tracker reads and writes the CUDA generator through its own helpers.
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    _APPLIED = True
