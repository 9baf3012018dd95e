"""Reproducible randomness without touching the caller's global RNG state.

Every process of a federated run (server, each client) must draw the same random
numbers for the same purpose: identical base weights, identical LoRA initialisation,
and a client's shuffling/dropout that depends only on (run seed, round, client).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch


def derive_seed(seed: int, *tags: int | str) -> int:
    """A 63-bit seed for one purpose, e.g. ``derive_seed(2024, "shuffle", round, client)``.

    A hash (not ``seed + k``) so that nearby seeds and tags give unrelated streams.
    """
    text = "/".join(str(part) for part in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNGs seeded, then restore them.

    Forks the CPU RNG and, when this process already uses CUDA, the current device's RNG
    (forking every device is slow and warns on multi-GPU hosts). A process that has not touched
    CUDA is not made to: asking for the current device would open a CUDA context (hundreds of MB
    of GPU memory), e.g. in the ServerApp, which only builds the initial LoRA on the CPU.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def torch_generator(seed: int) -> torch.Generator:
    """A private CPU generator (e.g. for DataLoader shuffling)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
