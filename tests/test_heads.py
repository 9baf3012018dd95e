"""`train.data-fraction`: each round trains on a fresh share of a client's data (fellrec_flwr/heads.py)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from fellrec_flwr.config import FellRecConfig
from fellrec_flwr.heads import round_share, train_head


def test_the_whole_data_at_fraction_one_in_order():
    items = list(range(10))
    assert round_share(items, 1.0, seed=3) == items
    assert round_share([], 0.5, seed=3) == []


def test_a_share_is_distinct_items_in_their_order_fresh_each_round():
    items = [f"user {i}" for i in range(200)]
    first = round_share(items, 0.25, seed=1)
    assert len(first) == 50 and len(set(first)) == 50 and set(first) <= set(items)
    assert first == sorted(first, key=items.index)  # training order stays the data's (then the trainer shuffles)
    assert round_share(items, 0.25, seed=1) == first  # the same seed: the same share (resumable, reproducible)
    second = round_share(items, 0.25, seed=2)
    assert second != first and len(second) == 50  # another round's seed: another share
    assert round_share(items, 0.001, seed=1) != []  # at least one item


@pytest.mark.parametrize("head", ["item", "generative"])
def test_train_head_trains_on_the_rounds_share(monkeypatch, head):
    import fellrec_flwr.model.item_head as item_head
    import fellrec_flwr.train.trainer as trainer

    seen = {}

    def fake_item(model, sequences, *args, **kwargs):
        seen["data"] = sequences

    def fake_local(model, tokenizer, examples, *args, **kwargs):
        seen["data"] = examples

    monkeypatch.setattr(item_head, "train_item_head", fake_item)
    monkeypatch.setattr(item_head, "group_sequences", lambda seqs, groups: [list(s) for s in seqs.values()])
    monkeypatch.setattr(trainer, "train_local", fake_local)
    data = SimpleNamespace(sequences=lambda client: {u: (u, u + 1) for u in range(40)},
                           split=lambda name, client=None: [("prompt", u) for u in range(40)], titles={})
    rt = SimpleNamespace(model=None, tokenizer=None, groups=None, data=data)
    cfg = FellRecConfig()
    cfg = replace(cfg, model=replace(cfg.model, head=head), train=replace(cfg.train, data_fraction=0.1))
    train_head(cfg, rt, client=0, seed=5)
    assert len(seen["data"]) == 4
    cfg = replace(cfg, train=replace(cfg.train, data_fraction=1.0))
    train_head(cfg, rt, client=0, seed=5)
    assert len(seen["data"]) == 40
