"""The Gaussian-noise defence and its price.

The client adds ``N(0, (sigma * rms)^2)`` to every vector it sends at the front cut, where
``rms`` is the root-mean-square entry of that vector: sigma is noise relative to signal.
The attacker is assumed to know sigma (it trains its inverter on equally noisy vectors),
which is the stronger attack. The price is the model's loss on the real sequences when
the noise is really injected at that cut (every later layer computes on the noisy input).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from fellrec_flwr.audit.observe import decoder_layers, frozen_eval, pad_batch, sequence_losses
from fellrec_flwr.audit.sequences import AuditError, AuditSequence


def add_relative_noise(vectors: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """``vectors + sigma * rms(row) * N(0, 1)``, rms per row (pure; same seed -> same noise)."""
    if sigma == 0:
        return vectors
    rms = np.sqrt(np.mean(vectors.astype(np.float64) ** 2, axis=1, keepdims=True))
    noise = np.random.default_rng(seed).standard_normal(vectors.shape)
    return (vectors + sigma * rms * noise).astype(np.float32)


@dataclass(frozen=True)
class NoiseAt:
    """The Gaussian-noise defence: the client adds N(0, (sigma * rms)^2) to what it sends at a cut.

    ``rms`` is the root-mean-square entry of the clean activation at that position, so
    sigma is relative to the signal. The hook changes the input of decoder layer ``layer``
    (hidden_states[layer] includes the noise), i.e. the server sees and computes on it.
    """

    layer: int
    sigma: float
    seed: int

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        layers = decoder_layers(model)
        if not 0 <= self.layer < len(layers):
            raise AuditError(f"noise cut {self.layer} is outside 0..{len(layers) - 1}.")
        gen = torch.Generator(device="cpu").manual_seed(self.seed)

        def add_noise(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            rms = h.pow(2).mean(-1, keepdim=True).sqrt().detach()
            noisy = h + self.sigma * rms * torch.randn(h.shape, generator=gen).to(h.device, h.dtype)
            if args:
                return (noisy, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": noisy}

        handle = layers[self.layer].register_forward_pre_hook(add_noise, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def mean_loss(model: torch.nn.Module, sequences: Sequence[AuditSequence], pad_id: int, batch_size: int = 8,
              train_on_inputs: bool = True, noise: NoiseAt | None = None) -> float:
    """Mean over sequences of the per-sequence token loss, with the noise hook when given."""
    device = next(model.parameters()).device
    losses = []
    with frozen_eval(model), torch.no_grad(), (noise.applied(model) if noise else contextlib.nullcontext()):
        for i in range(0, len(sequences), batch_size):
            ids, attention, mask = (t.to(device) for t in pad_batch(sequences[i:i + batch_size], pad_id,
                                                                    train_on_inputs))
            logits = model(input_ids=ids, attention_mask=attention).logits
            losses.extend(sequence_losses(logits, ids, mask).tolist())
    return float(np.mean(losses))
