"""Which GPU this is, as tuned files name it: 'NVIDIA H200' -> key 'h200', family 'h200'."""

from __future__ import annotations

import re
from dataclasses import dataclass

_VENDOR_WORDS = ("geforce", "tesla", "quadro")
INTERPRETER_KEY = "cpu-interpreter"  # the CPU, where kernels run in Triton's interpreter


@dataclass(frozen=True)
class GpuIdentity:
    key: str  # file key: 'h200', 'a100-sxm4-80gb'
    family: str  # 'h200', 'a100'
    compute_capability: str  # '9.0'
    sm_count: int
    name: str


def gpu_key(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100-sxm4-80gb'."""
    name = device_name.lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def gpu_family(key: str) -> str:
    """'a100-sxm4-80gb' -> 'a100'; 'geforce-rtx-4090' -> 'rtx-4090'."""
    parts = key.split("-")
    while len(parts) > 1 and parts[0] in _VENDOR_WORDS:
        parts = parts[1:]
    if parts[0] == "rtx" and len(parts) > 1:
        return "-".join(parts[:2])
    return parts[0]


def identify(device) -> GpuIdentity:
    """The identity of a torch device (CPU: the interpreter, which has no tuned files)."""
    if device.type != "cuda":
        return GpuIdentity(INTERPRETER_KEY, INTERPRETER_KEY, "none", 0, "CPU")
    import torch

    props = torch.cuda.get_device_properties(device)
    key = gpu_key(props.name)
    return GpuIdentity(key, gpu_family(key), f"{props.major}.{props.minor}",
                       props.multi_processor_count, props.name)
