"""Users -> clients, as flwr-datasets partitioners over a per-user ``datasets.Dataset``.

The per-user dataset has one row per user: ``user_id``, ``embedding`` (the user's BPR vector)
and ``category`` (an item-category proxy, below). ``partitioner.load_partition(i)`` returns
client i's users, like any flwr-datasets partitioner.

- ``kmeans`` (the paper's): K-means (seeded, ``n_init`` fixed) on the BPR user embeddings;
  each cluster is a client. Clients are numbered by cluster size, largest first.
- ``iid``: users shuffled (seeded), then cut into equal contiguous shards (flwr-datasets'
  IidPartitioner on the shuffled rows).
- ``dirichlet``: label skew as in flwr-datasets' DirichletPartitioner, with the "label" being
  an item-category proxy, because Amazon items have no usable category here: the items are
  clustered into ``DIRICHLET_CATEGORIES`` groups by K-means on their BPR embeddings, and a
  user's category is the group most of their training items fall in (ties: lowest group).
  Each category's users are then split over the clients with Dirichlet(alpha) proportions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where used: flwr-datasets, datasets and scikit-learn cost ~100 MB to import
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

from data_prep.errors import DataPrepError
from data_prep.kmeans import kmeans_labels

DIRICHLET_CATEGORIES = 10
# A Dirichlet client must hold at least this share of an even split of the users
# (flwr-datasets redraws the proportions up to 10 times otherwise).
DIRICHLET_MIN_SHARE = 0.1


def item_categories(item_embeddings: np.ndarray, seed: int, num_categories: int = DIRICHLET_CATEGORIES) -> np.ndarray:
    """Category proxy per item: K-means cluster of its BPR embedding."""
    k = min(num_categories, len(item_embeddings))
    return kmeans_labels(item_embeddings, k, seed)


def dominant_category(sequences: list[list[int]], categories: np.ndarray) -> np.ndarray:
    """Per user: the category most of their items belong to (ties -> lowest category id)."""
    k = int(categories.max()) + 1
    return np.array([int(np.argmax(np.bincount(categories[s], minlength=k))) for s in sequences], dtype=np.int64)


def make_partitioner(name: str, num_clients: int, seed: int, dirichlet_alpha: float,
                     num_users: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner

    from data_prep.flower_partitioners import KMeansPartitioner, ShuffledIidPartitioner

    if name == "kmeans":
        return KMeansPartitioner(num_clients, partition_by="embedding", seed=seed)
    if name == "iid":
        return ShuffledIidPartitioner(num_clients, seed=seed)
    if name == "dirichlet":
        if dirichlet_alpha <= 0:
            raise DataPrepError(f"data.dirichlet-alpha={dirichlet_alpha} must be > 0.")
        min_size = max(1, int(DIRICHLET_MIN_SHARE * num_users / num_clients))
        return DirichletPartitioner(num_clients, partition_by="category", alpha=float(dirichlet_alpha),
                                    min_partition_size=min_size, self_balancing=False, shuffle=False,
                                    seed=seed)
    raise DataPrepError(f"data.partitioner={name!r} is not one of kmeans, iid, dirichlet.")


def user_dataset(user_ids: list[int], embeddings: np.ndarray, categories: np.ndarray) -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict({"user_id": list(user_ids), "embedding": embeddings.astype(np.float32).tolist(),
                              "category": categories.tolist()})


def assign_clients(partitioner: Partitioner, users: Dataset) -> dict[int, int]:
    """user_id -> partition id, checking every user lands in exactly one non-empty partition."""
    from data_prep.flower_partitioners import _column

    partitioner.dataset = users
    client_of: dict[int, int] = {}
    for pid in range(partitioner.num_partitions):
        members = _column(partitioner.load_partition(pid), "user_id").tolist()
        if not members:
            raise DataPrepError(f"Client {pid} got no users; lower data.num-clients or choose another "
                                "partitioner.")
        for u in members:
            if u in client_of:
                raise DataPrepError(f"User {u} was assigned to clients {client_of[u]} and {pid}.")
            client_of[u] = pid
    if len(client_of) != users.num_rows:
        raise DataPrepError(f"The partitioner assigned {len(client_of)} of {users.num_rows} users.")
    return client_of


def __getattr__(name: str) -> Any:
    """The partitioner classes, imported on first use (data_prep/flower_partitioners.py)."""
    if name in ("KMeansPartitioner", "ShuffledIidPartitioner", "_column"):
        from data_prep import flower_partitioners

        return getattr(flower_partitioners, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
