"""Grounding: title groups, exact top-k on a hand-made table, the base-model embedding and its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fellrec_flwr.eval.grounding import (Catalogue, GroundingError, TitleGroups, embed_texts, rank,
                                    rank_groups)
from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer

# ids 1, 4 share "Halo"; 2, 6 share "Doom". Groups (by smallest id): 0 Tetris, 1 Halo, 2 Doom, 3 Zelda, 4 Mario
TITLES = {0: "Tetris", 1: "Halo", 2: "Doom", 3: "Zelda", 4: "Halo", 5: "Mario", 6: "Doom"}
TABLE = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 5.0]])  # one row per group


@pytest.fixture()
def catalogue() -> Catalogue:
    return Catalogue(TitleGroups.from_titles(TITLES), TABLE)


def test_title_groups():
    groups = TitleGroups.from_titles(TITLES)
    assert groups.titles == ("Tetris", "Halo", "Doom", "Zelda", "Mario")
    assert groups.members == ((0,), (1, 4), (2, 6), (3,), (5,))
    assert groups.rep_ids.tolist() == [0, 1, 2, 3, 5]
    assert groups.canonical.tolist() == [0, 1, 2, 3, 1, 5, 2]
    with pytest.raises(GroundingError, match="not in the catalogue"):
        groups.group_index([7])


def test_exact_order_with_duplicate_titles_and_history_masking(catalogue):
    queries = np.array([[1.2, 0.0], [1.2, 0.0], [2.9, 0.0]])
    histories = [[], [4], [6, 3, 0]]  # id 4 masks the whole "Halo" group (ids 1 and 4)
    ranked = rank(queries, catalogue, catalogue.history_mask(histories), k=5)
    assert ranked.tolist() == [
        [1, 2, 0, 3, 5],  # distances 0.2, 0.8, 1.2, 1.8, ~5.1
        [2, 0, 3, 5, -1],  # Halo masked: one group fewer -> padding
        [1, 5, -1, -1, -1],  # Doom, Zelda, Tetris masked
    ]
    assert rank(queries, catalogue, None, k=2).tolist() == [[1, 2], [1, 2], [3, 2]]  # 2.9: Zelda, then Doom
    # k larger than the catalogue is padded
    assert rank(queries[:1], catalogue, None, k=7).tolist() == [[1, 2, 0, 3, 5, -1, -1]]


def test_ties_go_to_the_smaller_id_also_at_the_cutoff():
    titles = {0: "a", 1: "b", 2: "c", 3: "d"}
    table = np.array([[0.0], [1.0], [1.0], [1.0]])  # b, c, d equally far from 0.9... tie at the cut
    cat = Catalogue(TitleGroups.from_titles(titles), table)
    for k in (1, 2, 3, 4):
        assert rank(np.array([[1.0]]), cat, None, k).tolist()[0] == [1, 2, 3, 0][:k]


def test_matches_brute_force_distances():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(300, 16)).astype(np.float32)
    cat = Catalogue(TitleGroups.from_titles({i: f"t{i}" for i in range(300)}), table)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    masks = rng.random((40, 300)) < 0.1
    got = rank_groups(queries, cat, masks, k=20)
    dist = np.linalg.norm(queries[:, None, :].astype(np.float64) - table[None].astype(np.float64), axis=2)
    dist[masks] = np.inf
    assert (got == np.argsort(dist, axis=1, kind="stable")[:, :20]).all()


def test_bad_shapes(catalogue):
    with pytest.raises(GroundingError, match="query embeddings"):
        rank(np.zeros((1, 3)), catalogue, None, 2)
    with pytest.raises(GroundingError, match="history masks"):
        rank(np.zeros((1, 2)), catalogue, np.zeros((2, 5), bool), 2)
    with pytest.raises(GroundingError, match="one row per title group"):
        Catalogue(TitleGroups.from_titles(TITLES), TABLE[:3])


# --- the base-model embedding (tiny model) ---------------------------------------------------

WORDS = ["Mario", "Zelda", "Halo", "Doom", "Tetris", "Sonic", "Kirby", "Metroid"]
GAME_TITLES = {i: f"{w} {i // len(WORDS)} Deluxe Edition" for i, w in enumerate(WORDS * 3)}
GAME_TITLES[24] = GAME_TITLES[3]  # a duplicate title


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = train_tokenizer(GAME_TITLES.values(), 300, tmp_path_factory.mktemp("tok") / "tok")
    return build_tiny_model(tok, hidden=32, layers=2, heads=2, seed=0), tok


def test_embedding_is_the_last_real_token_state_and_batch_invariant(tiny):
    model, tok = tiny
    texts = list(GAME_TITLES.values())[:9] + ["Halo"]
    batched = embed_texts(model, tok, texts, batch_size=4)
    one_by_one = embed_texts(model, tok, texts, batch_size=1)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    with torch.no_grad():
        ids = tok(texts[0], return_tensors="pt")
        direct = model(**ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
    np.testing.assert_allclose(batched[0], direct, atol=1e-5)
    assert embed_texts(model, tok, [""]).shape == (1, 32)  # empty generation still embeds


def test_peft_model_embeds_with_adapters_disabled_and_keeps_train_mode(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    base = embed_texts(model, tok, ["Halo 1 Deluxe Edition"])
    peft_model = get_peft_model(build_tiny_model(tok, hidden=32, layers=2, heads=2, seed=0),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.train()
    with torch.no_grad():
        ids = tok("Halo 1 Deluxe Edition", return_tensors="pt")
        adapted = peft_model(**ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
    assert np.abs(adapted - base[0]).max() > 1e-3  # the adapter does change the model...
    np.testing.assert_allclose(embed_texts(peft_model, tok, ["Halo 1 Deluxe Edition"]), base, atol=1e-5)  # ...not here
    assert peft_model.training


def test_exact_title_grounds_to_its_own_group_first(tiny):
    """The perfect oracle: generating a title exactly ranks that title's group at position 0."""
    model, tok = tiny
    cat = Catalogue.build(model, tok, GAME_TITLES, batch_size=8, progress=False)
    queries = embed_texts(model, tok, list(cat.groups.titles), batch_size=3)  # other batches than the table
    top = rank_groups(queries, cat, None, k=3)
    assert (top[:, 0] == np.arange(len(cat))).all()
    assert rank(queries[3:4], cat, None, k=1)[0, 0] == 3  # "Doom 0 ..." (ids 3 and 24) reported as 3


def test_catalogue_cache_is_reused_and_keyed_by_the_weights(tiny, tmp_path):
    model, tok = tiny
    calls = []

    def counting_embed(texts):
        calls.append(len(texts))
        return embed_texts(model, tok, texts)

    first = Catalogue.build(model, tok, GAME_TITLES, cache_dir=tmp_path, embed_fn=counting_embed, progress=False)
    again = Catalogue.build(model, tok, GAME_TITLES, cache_dir=tmp_path, embed_fn=counting_embed, progress=False)
    assert calls == [len(first)] and len(list(tmp_path.glob("catalogue-*.npy"))) == 1
    np.testing.assert_array_equal(first.embeddings, again.embeddings)
    other = build_tiny_model(tok, hidden=32, layers=2, heads=2, seed=1)
    Catalogue.build(other, tok, GAME_TITLES, cache_dir=tmp_path, progress=False)
    Catalogue.build(model, tok, {**GAME_TITLES, 99: "New Game"}, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("catalogue-*.npy"))) == 3  # other weights, other titles: new entries
