"""NoPeek, the learned wire defence (`split.defence = nopeek`, issue 25).

Vepakomma et al., "NoPeek: Information leakage reduction to share activations in distributed deep
learning" (arXiv:2008.09161): the client adds

    alpha x dCor(raw input, activation it sends)

to its training loss, so its front layers learn activations that stay useful to the server's layers
but are as little a function of the raw input as alpha buys. dCor is Szekely's distance correlation
(in [0, 1]; 0 iff independent, for finite samples ~0; 1 for a linear map up to scale and rotation).

What the samples are here. The paper correlates a batch of images with their activations. A prompt
is a sequence, and the server's inverter (fellrec_flwr/audit/inverter.py) reads it back one position
at a time, mapping the activation at a position to that token's input-embedding row. So a sample is
one real (non-padding) token position of the batch: X = the token's input embedding (the output of
the embedding layer, hidden state 0: the raw input as the client's layers see it; a one-hot over a
49k vocabulary would make every pair of distinct tokens equally far apart and carry no similarity),
Z = the hidden state the client sends at that position (the input of decoder layer `front_k`).
At most MAX_POSITIONS positions (a seeded random subset) enter a batch's term, to bound the
n x n distance matrices.

`alpha = 0` adds nothing (no hook runs): the training is the training without a defence, bit for
bit. The term trains only what sits before the cut (the client's front LoRA); what is sent, and
how, is unchanged (bytes on the wire are the same).
"""

from __future__ import annotations

import math
from typing import Any

import torch

MAX_POSITIONS = 512  # token positions per batch in the dCor term (its cost is O(n^2 hidden))


class NoPeekError(ValueError):
    """A NoPeek setting or model it cannot work with."""


def check_alpha(alpha: float) -> None:
    if not math.isfinite(alpha) or alpha < 0:
        raise NoPeekError(f"split.nopeek-alpha={alpha} must be a finite number >= 0 (0 = no defence; the weight "
                          "of the distance correlation added to the client's loss).")


def _double_centred_distances(x: torch.Tensor) -> torch.Tensor:
    """[n, d] samples -> [n, n] Euclidean distance matrix with row, column and grand means removed."""
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    # sqrt's gradient at 0 is infinite: the diagonal (and repeated samples) sit at 0, so shift inside
    d = torch.sqrt(d2 + 1e-12)
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Szekely's sample distance correlation of paired samples ``x`` [n, p] and ``z`` [n, q] (a 0-d
    tensor in [0, 1], differentiable): sqrt(dCov^2(x, z) / sqrt(dVar^2(x) dVar^2(z))), 0 when either
    side is constant."""
    if x.dim() != 2 or z.dim() != 2 or x.shape[0] != z.shape[0]:
        raise NoPeekError(f"distance_correlation needs paired [n, p] and [n, q] samples, got {list(x.shape)} and "
                          f"{list(z.shape)}.")
    if x.shape[0] < 2:
        raise NoPeekError("distance_correlation needs at least two samples.")
    a = _double_centred_distances(x.double())
    b = _double_centred_distances(z.double())
    dcov2 = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    if float(dvar2.detach()) <= 0:
        return dcov2.new_zeros(()).to(z.dtype)
    return torch.sqrt((dcov2 / dvar2.sqrt()).clamp_min(0.0) + 1e-18).to(z.dtype)


class NoPeek:
    """Adds alpha x dCor(token embedding, sent activation) to a model's training loss.

    ``attach`` hooks the model (a causal LM, a PeftModel around one, or a split client whose layer
    `front_k` is the `RemoteBody`): the embedding's output and the input of decoder layer `front_k`
    are captured in each training forward (grad enabled, model in train mode), and the term is
    computed there, with its graph into the client's front layers. The trainer takes it with
    :meth:`take` after each forward and adds it to the loss it backpropagates.
    """

    def __init__(self, alpha: float, seed: int = 0, max_positions: int = MAX_POSITIONS):
        check_alpha(alpha)
        self.alpha, self.max_positions = float(alpha), int(max_positions)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.pending: list[torch.Tensor] = []
        self._embedded: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    @property
    def active(self) -> bool:
        return self.alpha > 0

    def attach(self, model: Any, front_k: int) -> "NoPeek":
        self.detach()
        if not self.active:
            return self
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
        layers = decoder.layers
        if not 1 <= front_k < len(layers):
            raise NoPeekError(f"front_k={front_k} is not a cut of this {len(layers)}-layer model.")
        self._handles = [decoder.register_forward_pre_hook(self._keep_mask, with_kwargs=True),
                         base.get_input_embeddings().register_forward_hook(self._keep_embedding),
                         layers[front_k].register_forward_pre_hook(self._add_term, with_kwargs=True)]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.pending = [], []

    def take(self) -> torch.Tensor | None:
        """The sum of the terms of the forwards since the last call (None if there was none)."""
        if not self.pending:
            return None
        total = torch.stack(self.pending).sum()
        self.pending = []
        return total

    # -- hooks ------------------------------------------------------------------------------

    def _keep_mask(self, module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        self._embedded = None

    def _keep_embedding(self, module: Any, args: tuple, output: torch.Tensor) -> None:
        self._embedded = output.detach()  # the public embedding: a fixed target, not trained by the term

    def _add_term(self, module: Any, args: tuple, kwargs: dict) -> None:
        embedded, self._embedded = self._embedded, None  # once per forward (a checkpoint recompute skips it)
        if embedded is None or not (torch.is_grad_enabled() and module.training):
            return
        sent = args[0] if args else kwargs["hidden_states"]
        if sent.shape[:2] != embedded.shape[:2]:
            raise NoPeekError(f"NoPeek saw embeddings {list(embedded.shape)} but a sent activation "
                              f"{list(sent.shape)}: a cached prefix (train.prefix-cache-mb) cannot be used with it.")
        real = torch.ones(sent.shape[:2], dtype=torch.bool) if self._mask is None else self._mask.to(torch.bool)
        index = real.reshape(-1).nonzero().squeeze(1)
        if index.numel() > self.max_positions:
            pick = torch.randperm(index.numel(), generator=self.generator)[: self.max_positions]
            index = index[pick.sort().values]
        if index.numel() < 2:
            return
        index = index.to(sent.device)
        x = embedded.reshape(-1, embedded.shape[-1])[index].float()
        z = sent.reshape(-1, sent.shape[-1])[index].float()
        self.pending.append(self.alpha * distance_correlation(x, z))
