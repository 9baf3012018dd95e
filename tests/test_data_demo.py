"""The built-in demo data set: deterministic, titled, structured beyond popularity."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.demo import GENRES, NUM_USERS, SEQ_MAX, SEQ_MIN, generate_demo, read_demo


def test_demo_is_deterministic_and_well_formed():
    a, b = generate_demo(), generate_demo()
    assert a.items.equals(b.items) and a.sequences == b.sequences
    assert 300 <= len(a.items) <= 500 and len(a.sequences) == NUM_USERS
    assert a.items["raw_title"].duplicated().sum() == 4
    assert all(SEQ_MIN <= len(s) <= SEQ_MAX and len(set(s)) == len(s) for s in a.sequences.values())
    source = read_demo()
    assert source.items["title"].str.contains("&amp;").sum() == 0
    assert set(source.items["item_id"]) == {i for s in source.sequences.values() for i in s}


def test_demo_has_taste_groups_and_series_structure():
    world = generate_demo()
    genre = world.items["genre"].map(GENRES.index).to_numpy()
    series, installment = world.items["series"].to_numpy(), world.items["installment"].to_numpy()
    primary = [np.mean(genre[s] == world.user_group[u]) for u, s in world.sequences.items()]
    assert np.mean(primary) > 0.5  # 6 genres: 1/6 if tastes did not differ
    pairs = [(a, b) for s in world.sequences.values() for a, b in zip(s, s[1:])]
    follows = np.mean([series[a] >= 0 and series[a] == series[b] and installment[b] == installment[a] + 1
                       for a, b in pairs])
    assert follows > 0.15  # the next installment follows often; by chance it would be ~1/360


def test_markov_beats_popularity_clearly_on_the_demo():
    """The demo's point: the next item is predictable from the history beyond popularity."""
    from data_prep.splits import build_splits
    from fellrec_flwr.eval.baselines import FittedBaselines
    from fellrec_flwr.eval.bootstrap import paired_difference_ci
    from fellrec_flwr.data.prepared import Example
    from fellrec_flwr.eval.results import metric_values

    source = read_demo()
    titles = dict(zip(source.items["item_id"].tolist(), source.items["title"].tolist()))
    splits = build_splits(source.sequences, history_len=10, train_samples=0, valid_users=0, test_users=0, seed=0)
    test = [Example(int(u), tuple(h), int(t)) for u, h, t in splits.test.itertuples(index=False)]
    fitted = FittedBaselines.fit(splits.train_sequences, titles)
    pop, markov = (metric_values(fitted.ranks(m, test), "recall@10") for m in ("popularity", "markov"))
    assert markov.mean() > 2 * pop.mean()
    assert paired_difference_ci(markov, pop).low > 0.1


def test_public_users_are_other_users_of_the_same_world_without_taste_groups():
    from data_prep.demo import DEMO_SEED, public_title_sequences

    clients = read_demo()
    client_titles = dict(zip(clients.items["item_id"], clients.items["title"]))
    client_seqs = {tuple(client_titles[i] for i in s) for s in clients.sequences.values()}
    public = public_title_sequences(400)
    assert public == public_title_sequences(400)  # deterministic
    assert not client_seqs & {tuple(s) for s in public}  # none of the clients' users
    world = generate_demo()
    genre_of = dict(zip(world.items["raw_title"].map(lambda t: t.replace("&amp;", "&").replace("  ", " ")),
                        world.items["genre"]))
    # no taste group: a user's most frequent genre covers far less of the sequence than for client users
    share = [max(np.unique([genre_of.get(t, "") for t in s], return_counts=True)[1]) / len(s) for s in public]
    own = [np.mean(world.items["genre"].to_numpy()[s] == GENRES[world.user_group[u]])
           for u, s in world.sequences.items()]
    assert np.mean(share) < np.mean(own) - 0.15
    with pytest.raises(ValueError, match="clients' own users"):
        public_title_sequences(3, seed=DEMO_SEED)
