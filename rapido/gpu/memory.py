"""How much of the device's memory is in use, for the cluster's scale signals."""

from __future__ import annotations

import sys


def device_memory() -> tuple[int, int] | None:
    """(bytes in use, bytes in all) of the current CUDA device, or None when this process
    has not put torch on a GPU (a CPU node, or a model on ONNX Runtime: its arena is not
    visible from here). Never imports torch itself: a CPU node need not load it."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    cuda = torch.cuda
    if not cuda.is_available() or not cuda.is_initialized():
        return None
    free, total = cuda.mem_get_info()
    return int(total - free), int(total)
