"""BPR matrix factorisation (Rendle et al., 2009) on the training interactions, in torch.

The K-means partitioner clusters the user embeddings learnt here (the paper clusters MF user
embeddings; the authors' MF recipe is not released, so this is ours):

- score(u, i) = <p_u, q_i>; loss = -log sigmoid(score(u, pos) - score(u, neg)) averaged over
  the batch, + ``reg`` * (|p_u|^2 + |q_pos|^2 + |q_neg|^2) / 2 on the batch's rows;
- one negative per positive, drawn uniformly from all items each epoch (a drawn negative is
  occasionally one of the user's positives; with thousands of items that is rare and harmless);
- sparse embeddings with SparseAdam, lr 0.03, batch 4096, init N(0, 0.1^2);
- everything seeded through one ``torch.Generator``: same data + seed -> same embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from fellrec_flwr.progress import tqdm


@dataclass(frozen=True)
class BprRecipe:
    lr: float = 0.03
    batch_size: int = 4096
    reg: float = 1e-4
    init_std: float = 0.1


@dataclass
class BprResult:
    user_embeddings: np.ndarray  # [num_users, dim], row k = k-th sequence
    item_embeddings: np.ndarray  # [num_items, dim]
    losses: list[float]  # mean loss per epoch


def interaction_pairs(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(user row, item) arrays for every interaction; the user row is the sequence's index."""
    users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    items = np.fromiter((i for s in sequences for i in s), dtype=np.int64, count=len(users))
    return users.astype(np.int64), items


def train_bpr(sequences: Sequence[Sequence[int]], num_items: int, dim: int, epochs: int, seed: int,
              recipe: BprRecipe = BprRecipe(), progress: bool = True) -> BprResult:
    # Batches of small embedding lookups gain nothing from intra-op threads, and on a busy
    # machine extra threads make them several times slower: run on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(sequences, num_items, dim, epochs, seed, recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _train(sequences: Sequence[Sequence[int]], num_items: int, dim: int, epochs: int, seed: int,
           recipe: BprRecipe, progress: bool) -> BprResult:
    users, items = interaction_pairs(sequences)
    if len(users) == 0:
        raise ValueError("BPR needs at least one training interaction.")
    gen = torch.Generator().manual_seed(seed)
    user_emb = torch.nn.Embedding(len(sequences), dim, sparse=True)
    item_emb = torch.nn.Embedding(num_items, dim, sparse=True)
    with torch.no_grad():
        user_emb.weight.normal_(0.0, recipe.init_std, generator=gen)
        item_emb.weight.normal_(0.0, recipe.init_std, generator=gen)
    opt = torch.optim.SparseAdam(list(user_emb.parameters()) + list(item_emb.parameters()), lr=recipe.lr)
    u_all, i_all = torch.from_numpy(users), torch.from_numpy(items)
    losses: list[float] = []
    for _ in tqdm(range(epochs), desc="BPR", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(u_all), generator=gen)
        negatives = torch.randint(num_items, (len(u_all),), generator=gen)
        total = 0.0
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            p, q_pos, q_neg = user_emb(u_all[idx]), item_emb(i_all[idx]), item_emb(negatives[idx])
            margin = (p * (q_pos - q_neg)).sum(-1)
            reg = (p.square().sum(-1) + q_pos.square().sum(-1) + q_neg.square().sum(-1)).mean() / 2
            loss = torch.nn.functional.softplus(-margin).mean() + recipe.reg * reg  # softplus(-x) = -log sigmoid(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
    return BprResult(user_emb.weight.detach().numpy().copy(), item_emb.weight.detach().numpy().copy(), losses)
