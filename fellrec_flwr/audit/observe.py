"""What an honest-but-curious split server observes, computed on one plain model.

With ``front_k`` layers on the client, the server receives the input of decoder layer
``front_k`` (``hidden_states[front_k]`` of a Hugging Face LLaMA with
``output_hidden_states=True``; ``hidden_states[0]`` is the embedding output). With
``back_k`` layers on the client, the server produces the input of layer ``L - back_k``
(``hidden_states[L - back_k]``) and, in training, receives the gradient of the client's
loss with respect to exactly that tensor. The split tests (tests/test_split*.py) check
that these are the tensors the split client and service exchange; here one forward pass
(and one backward pass that stops at the deepest back cut) yields all of them for every
cut at once.

The loss is the client's training loss: mean token cross-entropy over the whole sequence
(``train_on_inputs=True``, the authors' setting) or over the response only. Each sequence
gets its own mean, so a sequence's gradient does not depend on what it is batched with
(a real batch only rescales it, and the attacker normalises vectors anyway).

Storage: every vector is saved L2-normalised in float16 plus its norm in float32
(gradients are ~1e-6, below float16's range before normalising); only positions from the
first private title on are kept, the public template before it is never scored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from fellrec_flwr.progress import tqdm

from fellrec_flwr.audit.sequences import AuditError, AuditSequence


@dataclass
class Observed:
    """Per sequence: unit vectors (T_kept, d) float16, their norms (T_kept,), and the first kept position."""

    unit: list[np.ndarray] = field(default_factory=list)
    norms: list[np.ndarray] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)

    def raw(self, i: int) -> np.ndarray:
        """The observed vectors of sequence i as float32 (unit * norm)."""
        return self.unit[i].astype(np.float32) * self.norms[i][:, None]


@dataclass
class Observations:
    """Activations keyed by hidden-state index j (input of layer j), gradients likewise."""

    activations: dict[int, Observed]
    gradients: dict[int, Observed]
    num_layers: int


def _split_vectors(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    norms = x.norm(dim=-1)
    unit = x / norms.clamp_min(1e-30)[:, None]
    return unit.to(torch.float16).numpy(), norms.to(torch.float32).numpy()


@contextlib.contextmanager
def frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (only activation gradients are observed); eval mode; restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def pad_batch(seqs: Sequence[AuditSequence], pad_id: int, train_on_inputs: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and loss mask (causal attention never looks at the padding)."""
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, :len(s.input_ids)] = torch.tensor(s.input_ids)
        attention[row, :len(s.input_ids)] = 1
        loss_mask[row, (0 if train_on_inputs else s.response_start):len(s.input_ids)] = True
    return ids, attention, loss_mask


def sequence_losses(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sequence over the positions in ``loss_mask``.

    ``loss_mask[b, t]`` says whether token t is a label (predicted from position t-1).
    """
    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    logp = torch.log_softmax(logits[:, :-1].float() if low_precision else logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = loss_mask[:, 1:].float()
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)


@contextlib.contextmanager
def _graph_from(model: torch.nn.Module, layer: int | None) -> Iterator[list[torch.Tensor]]:
    """Start the autograd graph at the input of decoder ``layer`` (None: no graph).

    The input is detached and made a leaf, so backward runs through the last layers only
    (the gradient at the deepest back cut needs nothing before it): a 30-layer model with
    back cuts <= 8 pays for 8 layers of backward instead of 30. Yields a list that holds
    the leaf after the forward pass.
    """
    leaf: list[torch.Tensor] = []
    if layer is None:
        yield leaf
        return

    def make_leaf(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        leaf.append(h)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = decoder_layers(model)[layer].register_forward_pre_hook(make_leaf, with_kwargs=True)
    try:
        yield leaf
    finally:
        handle.remove()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return decoder.layers


def observe(model: torch.nn.Module, sequences: Sequence[AuditSequence], activation_layers: Sequence[int],
            gradient_layers: Sequence[int], pad_id: int, batch_size: int = 8, train_on_inputs: bool = True,
            desc: str = "observing") -> Observations:
    """Run every sequence through ``model`` and keep what crosses each requested cut.

    ``activation_layers`` / ``gradient_layers`` are hidden-state indices j in ``0..L``.
    """
    num_layers = int(model.config.num_hidden_layers)
    for j in list(activation_layers) + list(gradient_layers):
        if not 0 <= j < num_layers:
            raise AuditError(f"hidden-state index {j} is outside 0..{num_layers - 1} for this {num_layers}-layer "
                             "model (j = the decoder layer whose input is observed).")
    acts = {j: Observed() for j in sorted(set(activation_layers))}
    grads = {j: Observed() for j in sorted(set(gradient_layers))}
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    batches = [list(range(i, min(i + batch_size, len(sequences)))) for i in range(0, len(sequences), batch_size)]
    with frozen_eval(model), torch.set_grad_enabled(bool(grads)):
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            seqs = [sequences[i] for i in batch]
            ids, attention, loss_mask = (t.to(device) for t in pad_batch(seqs, pad_id, train_on_inputs))
            with _graph_from(model, min(grads) if grads else None) as leaf:
                out = model(inputs_embeds=embed(ids).detach(), attention_mask=attention, output_hidden_states=True)
                hidden = list(out.hidden_states)
                if grads:
                    hidden[min(grads)] = leaf[0]  # the leaf the backward pass stops at
                    for j in grads:
                        if j != min(grads):
                            hidden[j].retain_grad()
                    sequence_losses(out.logits, ids, loss_mask).sum().backward()
            for row, s in enumerate(seqs):
                start = max(0, min([sp.start for sp in s.history] + [s.response_start]) - 1)
                stop = len(s.input_ids)
                for store, source in [(acts, lambda j: hidden[j]), (grads, lambda j: hidden[j].grad)]:
                    for j, observed in store.items():
                        unit, norms = _split_vectors(source(j)[row, start:stop].detach().float().cpu())
                        observed.unit.append(unit)
                        observed.norms.append(norms)
                        observed.offset.append(start)
    return Observations(acts, grads, num_layers)
