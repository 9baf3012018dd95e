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

    Forks the CPU RNG and, when CUDA is present, the current device's RNG (forking
    every device is slow and warns on multi-GPU hosts).
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def torch_generator(seed: int) -> torch.Generator:
    """A private CPU generator (e.g. for DataLoader shuffling)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
