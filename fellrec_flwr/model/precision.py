"""Numeric precision on a GPU: casting a model without rounding its rotary frequencies, TF32.

- ``module.to(dtype)`` casts every floating buffer, among them the rotary embedding's ``inv_freq``
  (positions x inv_freq gives each token's rotation angle). In bf16 those frequencies carry a
  relative error of up to 0.4 %, so a token at position 500 is rotated by a visibly wrong angle;
  transformers itself keeps them in float32 (its rotary forward computes in float32 whatever the
  weights' dtype). :func:`cast_model` casts, then puts the float32 frequencies back.
- TF32 (Ampere and later GPUs) runs float32 matrix products on the tensor cores with 10-bit
  mantissa inputs, several times faster than plain float32; ``train.tf32`` sets it per process.
"""

from __future__ import annotations

import torch
from torch import nn

ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")


def cast_model(module: nn.Module, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> nn.Module:
    """``module.to(device, dtype)``, except that rotary frequencies stay float32 (on `device`)."""
    kept = [(owner, name, buf.detach().clone()) for owner in module.modules() for name in ROTARY_BUFFERS
            if isinstance(buf := owner._buffers.get(name), torch.Tensor) and buf.dtype == torch.float32]
    module.to(device=device, dtype=dtype)
    for owner, name, value in kept:
        owner._buffers[name] = value.to(device=owner._buffers[name].device)
    return module


def use_tf32(enabled: bool, device: torch.device) -> bool:
    """TF32 for this process's float32 matmuls on a CUDA `device` (``train.tf32``); True when it is on.
    A GPU without TF32 ignores the setting; on the CPU nothing is changed."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
    return enabled
