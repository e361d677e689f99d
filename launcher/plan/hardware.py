"""The GPU models launcher knows: memory, dense peaks, the names torch reports and the `gpu_type`
names cluster profiles use. Every reader (estimate, cost, pre-flight, bench) resolves a name here."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    key: str
    """The table's name of the model (`--gpu`, the device column of estimate, bench and cost)."""
    memory_bytes: int
    """Total memory as torch reports it (`torch.cuda.get_device_properties(0).total_memory`)."""
    bf16_tflops: float
    """Dense bf16/fp16 tensor-core peak, TFLOP/s."""
    tf32_tflops: float
    """Dense TF32 tensor-core peak, TFLOP/s: what fp32 matmuls reach only with TF32 switched on
    (torch.backends.cuda.matmul.allow_tf32, off by default in torch; launcher leaves it off)."""
    fp32_tflops: float
    """fp32 peak without tensor cores, TFLOP/s: what an fp32 run's matmuls reach under torch's defaults."""
    torch_names: tuple[str, ...]
    """What `torch.cuda.get_device_name` reports for the boards these numbers are for."""
    aliases: tuple[str, ...]
    """`gpu_type` names cluster profiles use for the model."""
    torch_pattern: str
    """Regular expression (case-insensitive) that finds the model in a torch device name not listed
    in torch_names (another board or form factor of the same chip)."""


# Dense peaks from the vendors' data sheets (half the "with sparsity" figures); memory as torch reports
# total_memory (H100 NVL and GH200: nvidia-smi's total less the 469 MiB torch does not count on an H100,
# not yet read from torch on those boards). Order matters where one name holds another: the PCIe and NVL
# boards of the H100 come before the H100 SXM row, which takes any other H100; GH200 is not an H200.
DEVICES: dict[str, Device] = {d.key: d for d in (
    Device("H100-PCIe", 85_029_158_912, 756.5, 378.0, 51.2, ("NVIDIA H100 PCIe",), ("h100-pcie",), r"H100.*PCIe"),
    Device("H100-NVL", 99_993_255_936, 835.5, 417.5, 60.0, ("NVIDIA H100 NVL",), ("h100-nvl",), r"H100.*NVL"),
    Device("H100-80GB", 85_029_158_912, 989.4, 494.7, 66.9, ("NVIDIA H100 80GB HBM3",), ("h100", "h100-80gb"),
           r"H100"),
    Device("GH200", 102_133_399_552, 989.4, 494.7, 66.9, ("NVIDIA GH200 480GB",), ("gh200",),
           r"GH200(?!.*144G)"),  # the 96 GB HBM3 board; the 144 GB HBM3e one is not in the table
    Device("H200", 150_110_011_392, 989.4, 494.7, 66.9, ("NVIDIA H200",), ("h200",), r"(?<!G)H200"),
    Device("A100-80GB", 85_089_976_320, 312.0, 156.0, 19.5, ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
           ("a100", "a100-80gb"), r"^(?!.*40GB).*A100"),  # an A100 without "40GB" in its name: the 80 GB one
    Device("A100-40GB", 42_505_273_344, 312.0, 156.0, 19.5, ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
           ("a100-40gb",), r"^(?=.*40GB).*A100"),
    Device("L40S", 47_697_362_944, 362.1, 183.0, 91.6, ("NVIDIA L40S",), ("l40s",), r"L40S"),
    Device("A10G", 23_677_698_048, 125.0, 62.5, 31.2, ("NVIDIA A10G",), ("a10g",), r"A10G"),
    Device("L4", 23_580_639_232, 121.0, 60.0, 30.3, ("NVIDIA L4",), ("l4",), r"(?:^|\s)L4(?:\s|$)"),  # a word: not L40, L40S
)}

_BY_NAME: dict[str, Device] = {n.casefold(): d for d in DEVICES.values()
                               for n in (d.key, *d.aliases, *d.torch_names)}


def find(name: str | None) -> Device | None:
    """The Device a name stands for: a key, a profile alias or a torch device name, any case; a torch
    name of another board of a known model by the model's name in it. None when no entry matches."""
    if not name:
        return None
    dev = _BY_NAME.get(name.strip().casefold())
    if dev is not None:
        return dev
    for d in DEVICES.values():
        if re.search(d.torch_pattern, name, re.IGNORECASE):
            return d
    return None


def peak_tflops(device: Device, dtype: str, tf32: bool = False) -> float:
    """Dense peak of `device` for a training dtype: bf16 and fp16 on the 16-bit tensor cores; fp32 on the
    CUDA cores, as torch runs fp32 matmuls by default, or on TF32 tensor cores when `tf32` is on."""
    if dtype == "fp32":
        return device.tf32_tflops if tf32 else device.fp32_tflops
    return device.bf16_tflops


# GPU models without bf16 arithmetic (before Ampere): `precision: auto` takes fp16 on them.
NO_BF16 = re.compile(r"V100|T4\b|P100|P40|K80|Titan V|RTX 20", re.IGNORECASE)

# CPU flags of fast bf16 matmuls (oneDNN's AMX tiles or AVX512-BF16 dot products).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flag(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The flag of this host's CPU that makes bf16 matmuls fast, or None. torch 2.13 reports only
    "AVX512" as its capability on CPUs that have both, so the kernel's flags are read instead."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return next((x for x in CPU_BF16_FLAGS if x in flags), None)
    except OSError:
        return None
    return None


def host_memory_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """This host's total memory (MemTotal), or None where it cannot be read."""
    try:
        with open(meminfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
