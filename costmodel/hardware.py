"""GPU hardware table: the per-device limits and peaks the analytic cost model and the feasibility filters read.

Numbers are dense (no 2:4 sparsity) vendor figures at the boost clock. Sources, one comment per device: NVIDIA's
product datasheets (peaks, bandwidth, memory) and architecture whitepapers (SM counts, L2, shared memory, registers);
per-SM limits are the CUDA C++ Programming Guide's "Technical Specifications per Compute Capability" table.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, TypedDict

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model. Rates are peaks at the boost clock; `*_tflops` are dense tensor-core peaks except fp32."""

    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    boost_clock_mhz: int
    hbm_bandwidth_gbs: float  # GB/s, 1e9 bytes
    memory_gib: int
    l2_bytes: int
    smem_per_sm_bytes: int
    smem_per_block_bytes: int  # the opt-in maximum one program (CTA) may allocate
    fp16_tflops: float  # tensor core, fp32 accumulate
    bf16_tflops: float
    tf32_tflops: float
    fp32_tflops: float  # CUDA cores, no tensor core
    max_threads_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int = 64 * KIB  # 32-bit registers; 64K on every architecture since Kepler
    max_registers_per_thread: int = 255
    # exp2/log2/rsqrt (MUFU) results per clock per SM: 16 for compute capability 8.x and 9.0 (CUDA C++ Programming
    # Guide, "Arithmetic Instructions" throughput table). Softmax's exp2 runs here, not on the tensor cores.
    sfu_ops_per_clock_per_sm: int = 16
    aliases: tuple[str, ...] = ()

    @property
    def arch(self) -> str:
        """Triton/ptxas architecture name, e.g. "sm_90"."""
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // 32

    def peak_flops(self, dtype: str, tensor_core: bool = True) -> float:
        """Peak FLOP/s for matmul inputs of `dtype` ('float16', 'torch.bfloat16', 'tf32', 'float32', ...).

        float32 inputs use the CUDA-core peak unless `tensor_core` (TF32 tensor cores) is asked for."""
        name = dtype.removeprefix("torch.")
        if name == "float16":
            tflops = self.fp16_tflops
        elif name == "bfloat16":
            tflops = self.bf16_tflops
        elif name == "tf32" or (name == "float32" and tensor_core):
            tflops = self.tf32_tflops
        elif name == "float32":
            tflops = self.fp32_tflops
        else:
            raise ValueError(f"dtype={dtype!r}: expected float16, bfloat16, tf32 or float32")
        return tflops * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_bandwidth_gbs * 1e9

    def target(self) -> dict[str, Any]:
        """The `target` dict `TiledPlan.infeasible_reasons` takes."""
        return {"smem_bytes": self.smem_per_block_bytes, "arch": self.arch}

    @property
    def sfu_ops_per_s(self) -> float:
        return self.sfu_ops_per_clock_per_sm * self.sm_count * self.boost_clock_mhz * 1e6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ArchLimits(TypedDict):
    compute_capability: tuple[int, int]
    smem_per_sm_bytes: int
    smem_per_block_bytes: int
    max_threads_per_sm: int
    max_blocks_per_sm: int


# Hopper (compute capability 9.0), per-SM limits shared by all Hopper parts: 228 KiB shared memory per SM, of which a
# block may opt in to 227 KiB; 2048 threads and 32 blocks per SM (CUDA Programming Guide, compute capability 9.0).
_HOPPER = _ArchLimits(
    compute_capability=(9, 0),
    smem_per_sm_bytes=228 * KIB,
    smem_per_block_bytes=227 * KIB,
    max_threads_per_sm=2048,
    max_blocks_per_sm=32,
)
# Ampere GA100 (8.0): 164 KiB shared memory per SM, 163 KiB per block opt-in; 2048 threads, 32 blocks per SM.
_AMPERE = _ArchLimits(
    compute_capability=(8, 0),
    smem_per_sm_bytes=164 * KIB,
    smem_per_block_bytes=163 * KIB,
    max_threads_per_sm=2048,
    max_blocks_per_sm=32,
)
# Ada (8.9): 100 KiB shared memory per SM, 99 KiB per block opt-in; 1536 threads and 24 blocks per SM.
_ADA = _ArchLimits(
    compute_capability=(8, 9), smem_per_sm_bytes=100 * KIB, smem_per_block_bytes=99 * KIB,
    max_threads_per_sm=1536, max_blocks_per_sm=24,
)  # fmt: skip

# fmt: off
GPUS: tuple[GPUSpec, ...] = (
    # H100 SXM5 80GB. NVIDIA H100 Tensor Core GPU datasheet: FP16/BF16 989 TFLOPS dense (the datasheet's 1979 is
    # with sparsity), TF32 494.7 dense, FP32 67, HBM3 3.35 TB/s. Hopper whitepaper: the SXM5 part enables 132 SMs,
    # 50 MB L2. Max boost clock 1980 MHz.
    GPUSpec(
        "NVIDIA H100 SXM", sm_count=132, boost_clock_mhz=1980, hbm_bandwidth_gbs=3350, memory_gib=80,
        l2_bytes=50 * MIB, fp16_tflops=989.4, bf16_tflops=989.4, tf32_tflops=494.7, fp32_tflops=66.9,
        aliases=("h100", "h100-sxm", "h100 sxm5", "h100 80gb hbm3"), **_HOPPER,
    ),
    # H100 PCIe 80GB. Same datasheet, PCIe column: 114 SMs, FP16/BF16 756 TFLOPS dense, TF32 378, FP32 51.2,
    # HBM2e 2.0 TB/s, boost 1755 MHz.
    GPUSpec(
        "NVIDIA H100 PCIe", sm_count=114, boost_clock_mhz=1755, hbm_bandwidth_gbs=2000, memory_gib=80,
        l2_bytes=50 * MIB, fp16_tflops=756.0, bf16_tflops=756.0, tf32_tflops=378.0, fp32_tflops=51.2,
        aliases=("h100-pcie", "h100 pcie"), **_HOPPER,
    ),
    # H200 SXM 141GB. NVIDIA H200 datasheet: the H100 SXM compute die (same 989 TFLOPS FP16/BF16 dense, 494.7 TF32,
    # 67 FP32) with 141 GB of HBM3e at 4.8 TB/s.
    GPUSpec(
        "NVIDIA H200", sm_count=132, boost_clock_mhz=1980, hbm_bandwidth_gbs=4800, memory_gib=141,
        l2_bytes=50 * MIB, fp16_tflops=989.4, bf16_tflops=989.4, tf32_tflops=494.7, fp32_tflops=66.9,
        aliases=("h200", "h200-sxm", "h200 sxm"), **_HOPPER,
    ),
    # A100 SXM4 40GB. NVIDIA A100 datasheet: FP16/BF16 312 TFLOPS dense, TF32 156, FP32 19.5, HBM2 1555 GB/s.
    # Ampere GA100 whitepaper: 108 SMs enabled, 40 MB L2, boost 1410 MHz.
    GPUSpec(
        "NVIDIA A100-SXM4-40GB", sm_count=108, boost_clock_mhz=1410, hbm_bandwidth_gbs=1555, memory_gib=40,
        l2_bytes=40 * MIB, fp16_tflops=312.0, bf16_tflops=312.0, tf32_tflops=156.0, fp32_tflops=19.5,
        aliases=("a100-40gb", "a100 40gb", "a100-sxm4-40gb"), **_AMPERE,
    ),
    # A100 SXM4 80GB. Same datasheet, 80GB column: identical compute, HBM2e at 2039 GB/s.
    GPUSpec(
        "NVIDIA A100-SXM4-80GB", sm_count=108, boost_clock_mhz=1410, hbm_bandwidth_gbs=2039, memory_gib=80,
        l2_bytes=40 * MIB, fp16_tflops=312.0, bf16_tflops=312.0, tf32_tflops=156.0, fp32_tflops=19.5,
        aliases=("a100", "a100-80gb", "a100 80gb", "a100-sxm4-80gb"), **_AMPERE,
    ),
    # L4 (AD104). NVIDIA L4 datasheet: FP16/BF16 121 TFLOPS dense (242 with sparsity), TF32 60, FP32 30.3, 24 GB
    # GDDR6 at 300 GB/s. Ada whitepaper: 58 SMs on the L4 configuration, 48 MB L2, boost 2040 MHz.
    GPUSpec(
        "NVIDIA L4", sm_count=58, boost_clock_mhz=2040, hbm_bandwidth_gbs=300, memory_gib=24,
        l2_bytes=48 * MIB, fp16_tflops=121.0, bf16_tflops=121.0, tf32_tflops=60.0, fp32_tflops=30.3,
        aliases=("l4",), **_ADA,
    ),
    # GeForce RTX 4090 (AD102). Ada whitepaper, appendix table: 128 SMs, 72 MB L2, boost 2520 MHz, 24 GB GDDR6X at
    # 1008 GB/s, FP32 82.6 TFLOPS; FP16/BF16 tensor 165.2 TFLOPS dense *with fp32 accumulate* (GeForce parts run
    # fp32-accumulate MMA at half the fp16-accumulate rate of 330.3; Triton accumulates in fp32), TF32 82.6.
    GPUSpec(
        "NVIDIA GeForce RTX 4090", sm_count=128, boost_clock_mhz=2520, hbm_bandwidth_gbs=1008, memory_gib=24,
        l2_bytes=72 * MIB, fp16_tflops=165.2, bf16_tflops=165.2, tf32_tflops=82.6, fp32_tflops=82.6,
        aliases=("rtx4090", "rtx 4090", "4090"), **_ADA,
    ),
)
# fmt: on


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.lower().removeprefix("nvidia").strip())


def gpu_names() -> list[str]:
    return [gpu.name for gpu in GPUS]


def get_gpu(name: str) -> GPUSpec:
    """Look a GPU up by its table name, an alias ("h100", "a100-40gb") or a `torch.cuda.get_device_name()` string
    ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"); raises ValueError naming the known GPUs otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty GPU name, got {name!r}")
    key = _norm(name)
    for gpu in GPUS:
        if key == _norm(gpu.name) or key in (_norm(a) for a in gpu.aliases):
            return gpu
    for gpu in GPUS:  # device-name strings carry extra words: "NVIDIA H100 PCIe" vs "h100 pcie", "H200 NVL"
        for alias in sorted(gpu.aliases, key=len, reverse=True):
            if _norm(alias) in key and ("pcie" in key) == ("pcie" in _norm(gpu.name)):
                return gpu
    raise ValueError(f"unknown GPU {name!r}; known: {gpu_names()}")


def gpu_for_device(device_name: str, capability: tuple[int, int] | None = None) -> GPUSpec:
    """The table entry for a CUDA device, by name first and by compute capability when the name is unknown
    (the first table entry of that capability: H100 SXM for 9.0, A100 80GB for 8.0, L4 for 8.9)."""
    try:
        return get_gpu(device_name)
    except ValueError:
        if capability is None:
            raise
    fallback = {(9, 0): "NVIDIA H100 SXM", (8, 0): "NVIDIA A100-SXM4-80GB", (8, 9): "NVIDIA L4"}
    if (capability[0], capability[1]) not in fallback:
        raise ValueError(f"unknown GPU {device_name!r} with compute capability {capability}; known: {gpu_names()}")
    return get_gpu(fallback[(capability[0], capability[1])])


# Max shared memory one block may opt in to, per arch (CUDA C++ Programming Guide, technical specifications per compute
# capability); 8.6 (GA10x: RTX 30xx, A10, A40) has no table entry above.
_SMEM_PER_BLOCK = {"sm_80": 163 * KIB, "sm_86": 99 * KIB, "sm_89": 99 * KIB, "sm_90": 227 * KIB}


def max_smem_per_block(arch: str) -> int:
    """The opt-in shared-memory limit of one program on `arch` ("sm_80", "sm_86", "sm_89", "sm_90")."""
    if arch not in _SMEM_PER_BLOCK:
        raise ValueError(f"arch={arch!r}; known: {sorted(_SMEM_PER_BLOCK)}")
    return _SMEM_PER_BLOCK[arch]


def current_gpu() -> GPUSpec:
    """The table entry of the current CUDA device; raises RuntimeError without one."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: pass a GPU name (e.g. get_gpu('h100')) instead")
    index = torch.cuda.current_device()
    return gpu_for_device(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))
