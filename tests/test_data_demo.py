"""The built-in demo data set: deterministic, titled, structured beyond popularity."""

from __future__ import annotations

import numpy as np

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
