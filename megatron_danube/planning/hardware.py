"""GPU specifications the planner uses, each figure with its public source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from megatron_danube.errors import DanubeConfigError

GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model as a node of eight of them offers it (dense peaks, no sparsity)."""

    name: str
    peak_bf16_tflops: float
    """Dense BF16 tensor-core peak."""
    peak_fp8_tflops: Optional[float]
    """Dense FP8 tensor-core peak; None where the GPU has no FP8."""
    memory_bytes: int
    """Device memory as the driver reports it (nvidia-smi's total)."""
    hbm_tb_s: float
    """Device-memory bandwidth, TB/s (the optimizer step is bound by it)."""
    nvlink_gb_s: float
    """NVLink bandwidth per GPU per direction, GB/s (intra-node collectives)."""
    internode_gb_s: float
    """Network bandwidth per GPU per direction, GB/s (one NIC per GPU)."""


GPUS: Dict[str, GpuSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s BF16 and 1,979 FP8 dense (the
    # datasheet's 1,979 / 3,958 are with sparsity), 3.35 TB/s HBM3, NVLink 900 GB/s (both
    # directions); nvidia-smi reports 81,559 MiB. Network: NVIDIA DGX H100 user guide, eight
    # ConnectX-7 400 Gb/s ports for eight GPUs = 50 GB/s per GPU.
    "h100": GpuSpec("NVIDIA H100 SXM5 80GB", 989.0, 1979.0, 81559 * 2**20, 3.35, 450.0, 50.0),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): same tensor-core peaks as the H100, 4.8 TB/s
    # HBM3e, NVLink 900 GB/s; 143,771 MiB as nvidia-smi reported it for this project's
    # measurements (docs/measurements/). Network: NVIDIA DGX H200 datasheet, eight ConnectX-7
    # 400 Gb/s ports = 50 GB/s per GPU.
    "h200": GpuSpec("NVIDIA H200 SXM 141GB", 989.0, 1979.0, 143771 * 2**20, 4.8, 450.0, 50.0),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 312 TFLOP/s BF16 dense, no FP8,
    # 2,039 GB/s HBM2e, NVLink 600 GB/s (both directions); nvidia-smi reports 81,920 MiB.
    # Network: NVIDIA DGX A100 user guide, eight ConnectX-6 200 Gb/s ports = 25 GB/s per GPU.
    "a100-80g": GpuSpec("NVIDIA A100 SXM4 80GB", 312.0, None, 81920 * 2**20, 2.039, 300.0, 25.0),
}

# What a benchmark JSON's `meta.device` (torch.cuda.get_device_name) names -> the table's key.
DEVICE_NAMES = {"H100": "h100", "H200": "h200", "A100": "a100-80g"}


def get_gpu(name: str) -> GpuSpec:
    try:
        return GPUS[name]
    except KeyError:
        raise DanubeConfigError(f"--gpu {name!r}; choose one of {', '.join(GPUS)}") from None


def gpu_of_device(device: str) -> str:
    """The table key of a device name such as 'NVIDIA H200'."""
    for marker, key in DEVICE_NAMES.items():
        if marker in device:
            return key
    raise DanubeConfigError(
        f"benchmark device {device!r} is none of the planner's GPUs ({', '.join(GPUS)}); "
        f"calibrate with a benchmark measured on one of them"
    )


def peak_tflops(gpu: GpuSpec, precision: str) -> float:
    """The tensor-core peak the linear layers run at under `precision` (bf16 or fp8)."""
    if precision == "fp8":
        if gpu.peak_fp8_tflops is None:
            raise DanubeConfigError(f"{gpu.name} has no FP8; use --precision bf16")
        return gpu.peak_fp8_tflops
    return gpu.peak_bf16_tflops
