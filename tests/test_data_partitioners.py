"""BPR and the user partitioners (flwr-datasets Partitioner subclasses)."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from data_prep.bpr import interaction_pairs, train_bpr
from data_prep.demo import generate_demo
from data_prep.errors import DataPrepError
from data_prep.partitioners import (KMeansPartitioner, ShuffledIidPartitioner, assign_clients,
                                    dominant_category, make_partitioner, user_dataset)


@pytest.fixture(scope="module")
def demo_train():
    world = generate_demo()
    seqs = [s[:-2] for s in world.sequences.values()]
    return world, seqs, len(world.items)


def test_interaction_pairs():
    users, items = interaction_pairs([[5, 6], [], [7]])
    assert users.tolist() == [0, 0, 2] and items.tolist() == [5, 6, 7]


def test_bpr_is_seeded_and_ranks_positives_above_random(demo_train):
    _, seqs, num_items = demo_train
    a = train_bpr(seqs, num_items, dim=16, epochs=10, seed=3, progress=False)
    b = train_bpr(seqs, num_items, dim=16, epochs=10, seed=3, progress=False)
    c = train_bpr(seqs, num_items, dim=16, epochs=10, seed=4, progress=False)
    assert np.array_equal(a.user_embeddings, b.user_embeddings)
    assert not np.array_equal(a.user_embeddings, c.user_embeddings)
    assert a.losses[-1] < a.losses[0] - 0.1
    # AUC of (user, positive) vs (user, random item), computed directly from the embeddings
    users, items = interaction_pairs(seqs)
    rng = np.random.default_rng(0)
    negatives = rng.integers(num_items, size=len(users))
    pos = (a.user_embeddings[users] * a.item_embeddings[items]).sum(1)
    neg = (a.user_embeddings[users] * a.item_embeddings[negatives]).sum(1)
    assert (pos > neg).mean() > 0.8


def blobs(sizes=(30, 20, 10)):
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    vectors = np.concatenate([c + rng.normal(size=(n, 2)) for c, n in zip(centres, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    order = rng.permutation(len(vectors))
    return vectors[order], truth[order]


def test_kmeans_partitioner_recovers_clusters_largest_first():
    vectors, truth = blobs()
    users = user_dataset(list(range(len(vectors))), vectors, np.zeros(len(vectors), dtype=np.int64))
    part = KMeansPartitioner(3, seed=1)
    part.dataset = users
    loaded = [part.load_partition(i) for i in range(part.num_partitions)]
    assert all(isinstance(d, Dataset) for d in loaded)
    for pid, blob in enumerate([0, 1, 2]):  # blob sizes 30 > 20 > 10
        ids = loaded[pid]["user_id"]
        assert sorted(ids) == sorted(np.flatnonzero(truth == blob).tolist())


def test_iid_partitioner_is_shuffled_balanced_and_seeded():
    users = user_dataset(list(range(103)), np.zeros((103, 1)), np.zeros(103, dtype=np.int64))
    first = assign_clients(ShuffledIidPartitioner(4, seed=7), users)
    again = assign_clients(ShuffledIidPartitioner(4, seed=7), users)
    other = assign_clients(ShuffledIidPartitioner(4, seed=8), users)
    sizes = np.bincount(list(first.values()))
    assert first == again and first != other
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 103
    assert [first[u] for u in range(25)] != [0] * 25  # not cut in file order


def test_dirichlet_partitioner_covers_every_user_once():
    cats = np.repeat(np.arange(5), 40)
    users = user_dataset(list(range(200)), np.zeros((200, 1)), cats)
    client_of = assign_clients(make_partitioner("dirichlet", 4, 0, 0.5, 200), users)
    assert sorted(client_of) == list(range(200))
    assert set(client_of.values()) == {0, 1, 2, 3}


def test_dominant_category_ties_go_to_lowest():
    categories = np.array([2, 0, 1, 1, 0])
    assert dominant_category([[0, 1], [2, 3, 4], [0]], categories).tolist() == [0, 1, 2]


def test_too_few_users_and_unknown_partitioner():
    users = user_dataset([1, 2], np.zeros((2, 1)), np.zeros(2, dtype=np.int64))
    with pytest.raises(DataPrepError, match="num-clients"):
        assign_clients(KMeansPartitioner(3), users)
    with pytest.raises(DataPrepError, match="not one of"):
        make_partitioner("random", 3, 0, 0.5, 10)
