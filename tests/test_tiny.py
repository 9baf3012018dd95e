"""The tiny model's public warm-up prompts: real structure, never the clients' users, never random."""

from __future__ import annotations

import pytest

from data_prep.demo import read_demo
from fellrec_flwr.model.tiny import demo_public_sequences, franchise_sequences, public_prompts, sequence_windows


@pytest.fixture(scope="module")
def demo_titles():
    source = read_demo()
    return dict(zip(source.items["item_id"].tolist(), source.items["title"].tolist())), source


def test_windows_are_every_prefix_with_its_next_item():
    assert sequence_windows([[1, 2, 3], [4, 5]], history_len=1) == [((1,), 2), ((2,), 3), ((4,), 5)]
    assert sequence_windows([[1, 2, 3]], history_len=5) == [((1,), 2), ((1, 2), 3)]


def test_demo_warmup_uses_public_users_with_series_structure(demo_titles):
    titles, source = demo_titles
    prompts = public_prompts(sorted(titles), 400, 10, seed=0, titles=titles)
    assert len(prompts) == 400
    public = demo_public_sequences(titles, 100)
    windows = set(sequence_windows(public + demo_public_sequences(titles, 400)[100:], 10))
    assert all((p.history, p.target) in windows for p in prompts)  # every prompt is a public user's window
    assert {tuple(s) for s in public}.isdisjoint({tuple(s) for s in source.sequences.values()})

    def sequel(prev: str, nxt: str) -> bool:  # "Name" -> "Name 2", "Name 2" -> "Name 3"
        base, _, num = prev.rpartition(" ")
        return nxt == f"{prev} 2" or (num.isdigit() and nxt == f"{base} {int(num) + 1}")

    follows = sum(sequel(titles[p.history[-1]], titles[p.target]) for p in prompts) / len(prompts)
    assert follows > 0.2  # random targets would be a sequel ~1/360 of the time


def test_other_catalogues_get_franchise_windows_not_random_histories():
    titles = {0: "Halo 2", 1: "Halo", 2: "Tetris", 3: "Halo 3", 4: "Zelda", 5: "Zelda II", 6: "Halo"}
    assert demo_public_sequences(titles, 10) is None
    assert sorted(franchise_sequences(titles)) == [[1, 0, 3], [4, 5]]  # duplicates: smallest id stands for the title
    prompts = public_prompts(sorted(titles), 30, 10, seed=1, titles=titles)
    allowed = {((1,), 0), ((1, 0), 3), ((4,), 5)}
    assert {(p.history, p.target) for p in prompts} <= allowed and len(prompts) == 30


def test_no_structure_at_all_is_a_clear_error():
    with pytest.raises(ValueError, match="tiny-pretrain-prompts=0"):
        public_prompts([0, 1], 5, 10, seed=0, titles={0: "Alpha", 1: "Beta"})
