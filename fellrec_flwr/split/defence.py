"""What the client does to a tensor before it crosses the network: the wire defences (issue 25).

`split.defence = noise`: every hidden state the client sends (front cut, forward and inference)
and every gradient it returns (back cut, backward) is first clipped per position, then given
Gaussian noise:

    C     = noise_clip * median L2 norm of the tensor's real (non-padding) positions
    x'    = x * min(1, C / ||x||)                     per position
    send  = x' + N(0, (noise_sigma * C / sqrt(H))^2)  per entry (H = hidden size)

So `noise_sigma` is the expected noise norm relative to the clip bound: sigma = 1 puts as much
noise on a position as the clip lets signal through. Clipping first is what makes that ratio
mean something: without it one large position (BOS often is 10-100x the others) sets the
scale. The bound is relative (a median) because activations and gradients differ by orders of
magnitude and between models; it is a practical noise-to-signal control, NOT a differential-privacy
guarantee (C depends on the batch, and no privacy accounting is done).

Strength 0 (`noise_sigma = 0`) returns the tensor unchanged (no clipping either), so the split
with the defence at strength 0 is the split without it, bit for bit.

The backward pass is straight-through: the client treats the server's gradient w.r.t. the noisy
input as the gradient w.r.t. its clean activation (the clip's own Jacobian is ignored).

Why no "random orthogonal mixing" of the hidden dimension: the server's layers cannot compute
on mixed activations. A Llama layer starts with RMSNorm, whose per-channel gain does not commute
with a rotation Q, and adds its output to the residual stream in the public basis; running on
Q x would need weights W Q^T, which hand the server Q (it knows W). tests/test_split_defence.py
shows layer(Q x) != Q layer(x) on the tiny model. See docs/privacy_audit.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fellrec_flwr.config import WIRE_DEFENCES as DEFENCES


class DefenceError(ValueError):
    """A wire-defence setting that cannot work (negative noise, no clip bound...)."""


def check_noise_settings(noise_sigma: float, noise_clip: float) -> None:
    """Clear errors for settings the noise defence cannot use."""
    if not math.isfinite(noise_sigma) or noise_sigma < 0:
        raise DefenceError(f"split.noise-sigma={noise_sigma} must be a finite number >= 0 (0 = no noise; "
                           "1 = noise as large as the clip bound).")
    if not math.isfinite(noise_clip) or noise_clip <= 0:
        raise DefenceError(f"split.noise-clip={noise_clip} must be > 0: the per-position clip bound as a multiple of "
                           "the median position norm (1 = clip every position above the median).")


def clip_bound(x: torch.Tensor, mask: torch.Tensor | None, noise_clip: float) -> torch.Tensor:
    """``noise_clip`` x the median L2 norm over the real positions of ``x`` [..., H] (a 0-d tensor)."""
    norms = x.detach().float().norm(dim=-1)
    if mask is not None:
        norms = norms[mask.to(torch.bool).expand_as(norms)]
    if norms.numel() == 0:
        return torch.zeros(())
    return noise_clip * norms.median()


def clip_and_noise(x: torch.Tensor, noise_sigma: float, noise_clip: float, generator: torch.Generator | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., H] clipped per position to the bound C, plus N(0, (sigma C / sqrt(H))^2) per entry.

    ``mask`` (broadcastable to x's leading dims, True = real token) says which positions set the
    median; every position is clipped and noised alike (padding included: it is sent too).
    ``noise_sigma == 0`` returns ``x`` itself.
    """
    check_noise_settings(noise_sigma, noise_clip)
    if noise_sigma == 0:
        return x
    bound = clip_bound(x, mask, noise_clip).to(torch.float32)
    xf = x.float()
    norms = xf.norm(dim=-1, keepdim=True)
    scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu").to(x.device)
    std = noise_sigma * bound / math.sqrt(x.shape[-1])
    return (xf * scale + std * noise).to(x.dtype)


@dataclass
class WireDefence:
    """The client's defence for what it sends, with its own random stream (reproducible by seed)."""

    kind: str = "none"
    noise_sigma: float = 0.0
    noise_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DEFENCES:
            raise DefenceError(f"split.defence={self.kind!r} is not one of {', '.join(DEFENCES)}.")
        if self.kind == "noise":
            check_noise_settings(self.noise_sigma, self.noise_clip)
        self.generator = torch.Generator(device="cpu").manual_seed(int(self.seed))

    @classmethod
    def from_settings(cls, split: Any, seed: int) -> "WireDefence":
        """From the run config's `split.*` (a SplitSettings)."""
        return cls(split.defence, float(split.noise_sigma), float(split.noise_clip), seed)

    @property
    def active(self) -> bool:
        return self.kind == "noise" and self.noise_sigma > 0

    def protect(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """What goes on the wire instead of ``x`` (``x`` itself when the defence is off or at strength 0)."""
        if not self.active:
            return x
        return clip_and_noise(x, self.noise_sigma, self.noise_clip, self.generator, mask)
