"""What each model head (``model.head``) trains on and how it is evaluated, in one place.

The ClientApp (one client's data) and the centralized command (every client's data) call these,
so a head means the same thing in both:

- ``generative`` (BIGRec): the `train` split's prompts; title generation grounded to the catalogue;
- ``retrieval`` (RecFormer-style): the same prompts; history and title vectors, cosine softmax;
- ``item`` (item tokens): every window of the users' training sequences; full-catalogue softmax.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

from fellrec_flwr.config import FellRecConfig
from fellrec_flwr.seeding import derive_seed

T = TypeVar("T")


def round_share(items: Sequence[T], fraction: float, seed: int) -> list[T]:
    """`train.data-fraction` of `items` (at least one), drawn without replacement from `seed`, in their order.

    A new seed each round draws a new share, so rounds cover the data like shuffled passes do."""
    if fraction >= 1.0 or not items:
        return list(items)
    import numpy as np

    count = max(1, round(fraction * len(items)))
    picked = np.random.default_rng(derive_seed(seed, "data-fraction")).choice(len(items), size=count, replace=False)
    return [items[i] for i in sorted(picked.tolist())]


def train_head(cfg: FellRecConfig, rt: Any, client: int | None, seed: int, proximal_mu: float = 0.0,
               lr_scale: float = 1.0) -> Any:
    """One local training call (`train.local-epochs` passes) on `client`'s data (None = everyone's), or on
    the round's `train.data-fraction` share of it.

    Returns the trainer's `TrainResult` (loss, steps, num_examples)."""
    if cfg.model.head == "item":
        from fellrec_flwr.model.item_head import group_sequences, train_item_head

        sequences = round_share(group_sequences(rt.data.sequences(client), rt.groups), cfg.train.data_fraction, seed)
        return train_item_head(rt.model, sequences, cfg.train, cfg.item_head, seed=seed, proximal_mu=proximal_mu,
                               lr_scale=lr_scale)
    examples = round_share(rt.data.split("train", client=client), cfg.train.data_fraction, seed)
    if cfg.model.head == "retrieval":
        from fellrec_flwr.model.retrieval import train_retrieval

        return train_retrieval(rt.model, rt.tokenizer, examples, rt.data.titles, cfg.train, cfg.retrieval, seed=seed,
                               proximal_mu=proximal_mu, lr_scale=lr_scale)
    from fellrec_flwr.train.trainer import train_local

    nopeek = getattr(rt, "nopeek", None)  # split.defence='nopeek' (fellrec_flwr/split/nopeek.py)
    return train_local(rt.model, rt.tokenizer, examples, rt.data.titles, cfg.train, seed=seed,
                       proximal_mu=proximal_mu, lr_scale=lr_scale,
                       penalty=nopeek.take if nopeek is not None and nopeek.active else None)


def evaluate_head(cfg: FellRecConfig, rt: Any, examples: Sequence[Any]) -> tuple[float, dict[str, float],
                                                                                   list[dict[str, Any]]]:
    """(eval-loss, metrics, per-user rows) of the current adapter on `examples`."""
    if cfg.model.head == "item":
        from fellrec_flwr.model.item_head import evaluate_item_head

        scores, rows = evaluate_item_head(rt.model, examples, rt.groups, batch_size=max(1, cfg.eval.batch_size) * 16)
        return scores["eval-loss"], scores, rows
    if cfg.model.head == "retrieval":
        from fellrec_flwr.model.retrieval import evaluate_retrieval

        scores, rows = evaluate_retrieval(rt.model, rt.tokenizer, examples, rt.data.titles, cfg.retrieval,
                                          cfg.train.max_length, max(1, cfg.eval.batch_size))
        return scores["eval-loss"], scores, rows
    from fellrec_flwr.eval.evaluate import evaluate_recommender
    from fellrec_flwr.train.trainer import eval_loss

    loss = eval_loss(rt.model, rt.tokenizer, examples, rt.data.titles, cfg.train)
    scores, rows = evaluate_recommender(rt.model, rt.tokenizer, examples, rt.data.titles, rt.catalogue, cfg.eval)
    return loss, scores, rows
