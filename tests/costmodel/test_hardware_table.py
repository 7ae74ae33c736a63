"""The GPU table is internally consistent and lookups accept table names, aliases and torch device names."""

from __future__ import annotations

import pytest

from tilefuse.costmodel.hardware import GPUS, get_gpu, gpu_for_device, max_smem_per_block

REQUIRED = ("H100 SXM", "H100 PCIe", "H200", "A100-SXM4-40GB", "A100-SXM4-80GB", "L4", "RTX 4090")


def test_required_gpus_are_present() -> None:
    names = " | ".join(gpu.name for gpu in GPUS)
    for required in REQUIRED:
        assert required in names


@pytest.mark.parametrize("gpu", GPUS, ids=lambda g: g.name)
def test_entry_is_consistent(gpu) -> None:  # type: ignore[no-untyped-def]
    assert gpu.sm_count > 0 and gpu.boost_clock_mhz > 0 and gpu.l2_bytes > 0
    assert 0 < gpu.smem_per_block_bytes <= gpu.smem_per_sm_bytes
    assert gpu.smem_per_block_bytes == max_smem_per_block(gpu.arch)
    assert gpu.max_warps_per_sm * 32 == gpu.max_threads_per_sm
    # tensor-core fp16 beats tf32 beats nothing; fp32 CUDA-core peak is below the fp16 tensor peak
    assert gpu.peak_flops("bfloat16") == gpu.peak_flops("torch.float16") > gpu.peak_flops("tf32")
    assert gpu.peak_flops("float32", tensor_core=False) < gpu.peak_flops("float16")
    # the fp32 peak is 2 FLOPs (FMA) × fp32 lanes per SM (64 on GA100, 128 on Ada/Hopper) × SMs × clock
    lanes = 64 if gpu.arch == "sm_80" else 128
    assert gpu.peak_flops("float32", tensor_core=False) == pytest.approx(
        2 * lanes * gpu.sm_count * gpu.boost_clock_mhz * 1e6, rel=0.06
    )
    assert 100 < gpu.hbm_bandwidth_gbs < 10_000


@pytest.mark.parametrize(
    ("device_name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("NVIDIA H200", "NVIDIA H200"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
        ("h100", "NVIDIA H100 SXM"),
    ],
)
def test_lookup_by_device_name(device_name: str, expected: str) -> None:
    assert get_gpu(device_name).name == expected


def test_lookup_falls_back_to_compute_capability() -> None:
    assert gpu_for_device("Some Future Hopper", (9, 0)).arch == "sm_90"
    with pytest.raises(ValueError, match="unknown GPU"):
        gpu_for_device("Mystery GPU", (7, 5))
    with pytest.raises(ValueError, match="known"):
        get_gpu("Voodoo 2")
    with pytest.raises(ValueError, match="arch"):
        max_smem_per_block("sm_75")
