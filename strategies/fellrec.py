"""FELLRec's dynamic balance strategy: one personalised aggregate per client.

Each round, from ONE snapshot of the uploads (sorted by client key), every client i gets
theta_i = sum_j W_ij theta_j with W from :func:`strategies.fellrec_math.dynamic_balance`
(similarity of the uploads, loss softmax, curriculum-heating warm weight). There is no
global model: the "global" arrays handed back to Flower's loop are the plain weighted
mean, for logging only. Round t of the heating formula is the absolute round - 1.

Every round it records, per client, its warm (heating) weight, loss probability and
self-weight W_ii (split "train"), and the full row of W as metrics "weight:<j>" (split
"balance"), so a run's metrics.csv shows whether the strategy personalises at all.
"""

from __future__ import annotations

from logging import INFO
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log

from fellrec_flwr.config import FellRecSettings

from . import fellrec_math
from .arrays import FlatLayout, block_columns
from .base import TRAIN_LOSS, metrics_of
from .personal import PersonalisedBase


def _spread(values: np.ndarray, keys: list[int]) -> str:
    low, high = int(np.argmin(values)), int(np.argmax(values))
    return (f"min {values[low]:.3f} (client {keys[low]}) / median {float(np.median(values)):.3f} / "
            f"max {values[high]:.3f} (client {keys[high]})")


def balance_summary(keys: list[int], balance: fellrec_math.Balance) -> str:
    """One short log line per round, whatever the number of clients (one entry per client was
    unreadable at 100): the spread of the self-weights W_ii and of the warm weights. The full
    matrix W goes to metrics.csv (split "balance", metrics "weight:<j>")."""
    return (f"FELLRec balance over {len(keys)} clients: self-weight {_spread(np.diag(balance.weights), keys)}; "
            f"warm weight {_spread(balance.warm, keys)}; full W in metrics.csv (split 'balance')")


class MissingTrainLossError(ValueError):
    """A train reply lacks the "train-loss" metric the loss softmax needs."""


def round_balance(
    settings: FellRecSettings,
    layout: FlatLayout,
    uploads: Sequence[ArrayRecord],
    losses: np.ndarray,
    t: int,
    received: Callable[[], Sequence[ArrayRecord]] | None = None,
    block_mb: float = 64.0,
    initial: Callable[[], ArrayRecord] | None = None,
) -> fellrec_math.Balance:
    """One round's weights W, with the similarity basis decided here and nowhere else.

    "parameters": the cosines of the uploads; "updates": of the uploads minus what each client
    received (`received()`, asked for only on this basis); "delta-w": of what each client learned
    since the run's start: the LoRA products B_i A_i (tensors named lora_A / lora_B in `layout`;
    B starts at 0), and for every other trainable tensor (e.g. the item head's modules_to_save) its
    change from the run's initial arrays (`initial()`). Raw, such a tensor would dominate the cosine
    with the initialisation all clients share (an item-id table of 1 M entries: every cosine about
    1, a uniform average). The uploads are read a block of ``block_mb`` MiB at a time (one LoRA
    module at a time for delta-w) into the Gram matrix: the (N, D) matrix of all uploads is never built.
    """
    n = len(uploads)
    if settings.similarity_basis == "delta-w":
        pairs, others = layout.lora_pairs()
        if not pairs:
            raise ValueError("fellrec.similarity-basis='delta-w' needs LoRA tensors named lora_A / lora_B; "
                             f"the uploads hold {list(layout.keys)[:3]}. Use 'parameters' instead.")
        if others and initial is None:
            raise ValueError(f"fellrec.similarity-basis='delta-w' compares tensors outside LoRA pairs ({others[:3]}) "
                             "by their change since the start: pass `initial`, the run's initial arrays.")
        start = initial() if others else None
        cosine = fellrec_math.delta_w_cosine(
            ((layout.gathered(uploads, a), layout.gathered(uploads, b)) for a, b in pairs),
            (layout.gathered(uploads, k).reshape(n, -1) - start[k].numpy().reshape(1, -1) for k in others),
        )
    else:
        reference = None
        if settings.similarity_basis == "updates":
            if received is None:
                raise ValueError("fellrec.similarity-basis='updates' needs the arrays each client received; "
                                 "pass `received`, or use the 'parameters' or 'delta-w' basis.")
            reference = received()
            for i, record in enumerate(reference):
                layout.check(record, f"the arrays sent to client {i}")
        blocks = layout.blocks(uploads, block_columns(block_mb, n), reference)
        cosine = fellrec_math.cosine_from_gram(fellrec_math.gram_of_blocks((b for _, _, b in blocks), n))
    return fellrec_math.dynamic_balance(None, losses, t, settings, cosine=cosine)


class FellRec(PersonalisedBase):
    """Personalised similarity-weighted aggregation with curriculum heating.

    ``settings`` are the ``fellrec.*`` keys (``FellRecSettings`` in fellrec_flwr/config.py,
    where their meaning, allowed values and defaults are written once); every other keyword
    goes to Flower's FedAvg and :class:`strategies.base.StrategyBase`.
    """

    def __init__(self, settings: FellRecSettings, *args: Any, **kwargs: Any) -> None:
        if not isinstance(settings, FellRecSettings):
            raise TypeError(f"FellRec takes a FellRecSettings (the fellrec.* keys) first, got {type(settings).__name__}.")
        super().__init__(*args, **kwargs)
        self.settings = settings.validate()
        self.first_loss: dict[int, float] = {}  # each client's training loss in its first round
        self.last_loss: dict[int, float] = {}
        self.warm: dict[int, float] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> FELLRec settings:")
        s = self.settings
        log(INFO, "\t│\t├── alpha %s | beta %s | loss T %s | heating %s (%s)",
            s.alpha, s.beta, s.temperature, s.heating, s.heating_exponent)
        log(INFO, "\t│\t└── similarity on %s, %s kernel | lr-scale %s | heating loss %s",
            s.similarity_basis, s.similarity_kernel, s.lr_scale, s.heating_loss)
        super().summary()  # type: ignore[misc]

    def add_train_config(self, config: ConfigRecord, node_id: int) -> None:
        key = self.node_to_key.get(node_id)
        # The warm weight from the client's last aggregation; 1.0 before it has one.
        config["lr-scale"] = float(self.warm.get(key, 1.0)) if self.settings.lr_scale and key is not None else 1.0

    def personal_weights(
        self,
        server_round: int,
        collected: list[tuple[int, int, Message]],
        layout: FlatLayout,
        uploads: list[ArrayRecord],
    ) -> np.ndarray:
        keys = [key for key, _, _ in collected]
        losses = self._losses(collected)
        balance = round_balance(self.settings, layout, uploads, self._heating_losses(keys, losses), server_round - 1,
                                received=lambda: self._received(collected), block_mb=self.aggregation_block_mb,
                                initial=lambda: self.initial_arrays)
        for i, key in enumerate(keys):
            self.last_loss[key] = float(losses[i])
            self.warm[key] = float(balance.warm[i])
        self._record_balance(server_round, keys, balance)
        return balance.weights

    def _losses(self, collected: list[tuple[int, int, Message]]) -> np.ndarray:
        losses = []
        for key, _, reply in collected:
            metrics = metrics_of(reply.content)
            if TRAIN_LOSS not in metrics:
                raise MissingTrainLossError(
                    f"client-key {key} replied without {TRAIN_LOSS!r}; FELLRec's loss softmax needs each "
                    "client's mean training loss in its train reply metrics."
                )
            losses.append(float(metrics[TRAIN_LOSS]))  # type: ignore[arg-type]
        return np.asarray(losses)

    def _heating_losses(self, keys: list[int], losses: np.ndarray) -> np.ndarray:
        """The losses the softmax sees: raw, or relative to each client's first-round loss."""
        for key, loss in zip(keys, losses):
            self.first_loss.setdefault(key, float(loss))
        if self.settings.heating_loss == "raw":
            return losses
        return fellrec_math.normalised_losses(losses, np.array([self.first_loss[k] for k in keys]))

    def _received(self, collected: list[tuple[int, int, Message]]) -> list[ArrayRecord]:
        """The arrays each client received this round (the reference of the "updates" basis)."""
        return [self._sent_arrays["train"][node_id] for _, node_id, _ in collected]

    def _record_balance(self, server_round: int, keys: list[int], balance: fellrec_math.Balance) -> None:
        for i, key in enumerate(keys):
            self.recorder.add_metrics(server_round, key, "train", {
                "warm-weight": float(balance.warm[i]), "self-weight": float(balance.weights[i, i]),
                "loss-prob": float(balance.loss_probs[i])})
            self.recorder.add_metrics(server_round, key, "balance",
                                      {f"weight:{other}": float(balance.weights[i, j]) for j, other in enumerate(keys)})
        log(INFO, "\t└──> %s", balance_summary(keys, balance))

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state.update({"last_loss": dict(self.last_loss), "warm": dict(self.warm), "first_loss": dict(self.first_loss)})
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.last_loss = {int(k): float(v) for k, v in state["last_loss"].items()}
        self.warm = {int(k): float(v) for k, v in state["warm"].items()}
        self.first_loss = {int(k): float(v) for k, v in state.get("first_loss", {}).items()}
