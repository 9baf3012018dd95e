"""Keep a client process's resident memory close to what it holds (glibc malloc settings).

torch's CPU tensors come from malloc. glibc serves a block by mmap only above a threshold that
starts at 128 KB and, each time such a block is freed, rises to its size (up to 32 MB). After the
first training step, the step's 1-32 MB temporaries (loss chunks' logits, activations, their
gradients) come from the heap instead, and freed heap memory stays resident: in
bench/split_app_memory.py a SmolLM2 split client kept ~300 MB of freed memory after a
training round, and its next step's peak stood on top of it. A fixed threshold makes every block
of `threshold` bytes or more an mmap that free() returns to the system at once; `trim()` hands
back what the heap still holds free after a message.

Linux with glibc only; elsewhere both are no-ops (and say so by returning False).
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers (glibc malloc.h)
DEFAULT_THRESHOLD = 1 << 20  # 1 MB: a training step's temporaries are larger, small objects stay on the heap

_applied: int | None = None


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 -- glibc has both; musl has neither
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more by mmap (fixed: glibc stops raising it),
    so that freeing a tensor returns its memory to the system. Idempotent; True when applied."""
    global _applied
    if _applied == threshold:
        return True
    libc = _libc()
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return False
    _applied = threshold
    return True


def trim() -> bool:
    """Give the heap's free pages back to the system (after a message: nothing of its temporaries
    stays resident while the client waits for the next one)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


# --------------------------------------------------------------------------- GPU memory (CUDA)
# torch's caching allocator keeps freed GPU blocks for reuse: without empty_cache a client actor holds
# its peak between messages, which the clients sharing that GPU (fractional num-gpus) cannot use.


def release_gpu_cache() -> bool:
    """Hand the allocator's free GPU blocks back to the driver (after a message). A process that never
    touched CUDA is left alone: asking would open a CUDA context. True when something was released."""
    import torch

    if not torch.cuda.is_initialized():
        return False
    torch.cuda.empty_cache()
    return True


def gpu_memory_mb(device) -> dict[str, float]:
    """What this process holds on `device`, in MB: ``peak-gpu-mb``, the most it reserved since the
    last ``torch.cuda.reset_peak_memory_stats`` (reserved, not allocated: the allocator's cache is
    memory a GPU neighbour cannot have either), and ``held-gpu-mb``, what stays reserved once the
    cache is emptied (weights and state kept between messages)."""
    import torch

    peak = torch.cuda.max_memory_reserved(device)
    torch.cuda.empty_cache()
    return {"peak-gpu-mb": peak / 2**20, "held-gpu-mb": torch.cuda.memory_reserved(device) / 2**20}
