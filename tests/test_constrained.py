"""Catalogue-constrained decoding: the trie, exactness against brute-force scoring, masking, the prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fellrec_flwr.data.collate import prompt_token_ids
from fellrec_flwr.eval.constrained import (ConstrainedError, ConstrainedRanker, TitleTrie, build_title_trie,
                                      constrained_search, rerank_with_prior, response_sequences,
                                      sequence_log_likelihoods)
from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.data.prompts import build_prompt
from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer

WORDS = ["Mario", "Zelda", "Halo", "Doom", "Tetris", "Sonic", "Kirby", "Metroid", "Portal", "Myst"]
TITLES = {i: f"{w} {i // len(WORDS)}" for i, w in enumerate(WORDS * 3)}
TITLES.update({30: "Halo", 31: "Halo 2", 32: TITLES[4]})  # a prefix title, and a duplicate ("Tetris 0")
GROUPS = TitleGroups.from_titles(TITLES)
HISTORIES = [[0, 1, 2], [5, 6], [4, 9, 10, 30], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = list(TITLES.values()) + [build_prompt(["A", "B"])]
    tok = train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tok")
    torch.manual_seed(0)
    model = build_tiny_model(tok, hidden=32, layers=2, heads=2, seed=0)
    with torch.no_grad():  # a random model is near-uniform; sharpen it so scores differ clearly
        model.lm_head.weight.mul_(8.0)
    return model, tok


def _prompts(tok, histories):
    return [prompt_token_ids(tok, build_prompt([TITLES[i] for i in h])) for h in histories]


def _brute_force(model, tok, prompt, masked, k):
    seqs = response_sequences(tok, GROUPS.titles)
    scores = sequence_log_likelihoods(model, prompt, seqs, pad_token_id=tok.pad_token_id or 0)
    order = [g for g in np.lexsort((np.arange(len(seqs)), -scores)) if g not in set(masked)]
    return np.array(order[:k]), scores[order[:k]]


# --- the trie ---------------------------------------------------------------


def test_trie_structure_on_hand_made_sequences():
    trie = TitleTrie.from_sequences([[1, 2, 3], [1, 2], [1, 4], [5], [1, 2]])  # 1 is [1,2] again (a duplicate)
    assert trie.terminal[trie.end_node[1]] == (1, 4)  # identical sequences share an end node
    assert trie.end_node[1] == trie.end_node[4] and trie.children[int(trie.end_node[1])] == {3: int(trie.end_node[0])}
    assert trie.subtree[0] == 5 and trie.max_depth[0] == 3
    assert trie.subtree[trie.children[0][1]] == 4
    assert trie.masked_counts([1, 0]) == {0: 2, trie.children[0][1]: 2, int(trie.end_node[1]): 2,
                                          int(trie.end_node[0]): 1}
    with pytest.raises(ConstrainedError, match="empty"):
        TitleTrie.from_sequences([[1], []])
    with pytest.raises(ConstrainedError, match="empty"):
        TitleTrie.from_sequences([])


def test_response_sequences_match_training_tokens(tiny):
    from fellrec_flwr.data.collate import response_token_ids

    _, tok = tiny
    seqs = response_sequences(tok, ["Halo 2", "Doom 1"])
    assert seqs == [response_token_ids(tok, "Halo 2"), response_token_ids(tok, "Doom 1")]  # '"Title"' + EOS


# --- the search --------------------------------------------------------------


def test_exact_top_k_equals_brute_force_when_beams_cover_the_catalogue(tiny):
    model, tok = tiny
    trie = build_title_trie(tok, GROUPS.titles)
    prompts = _prompts(tok, HISTORIES)
    masked = [GROUPS.group_index(h).tolist() for h in HISTORIES]
    k = 12
    groups, scores = constrained_search(model, prompts, trie, k, beams=len(GROUPS), masked_groups=masked,
                                        batch_users=3, pad_token_id=tok.pad_token_id)
    for row, prompt in enumerate(prompts):
        want_g, want_s = _brute_force(model, tok, prompt, masked[row], k)
        np.testing.assert_allclose(scores[row], want_s, rtol=0, atol=1e-4)
        assert np.all(np.diff(scores[row]) <= 0)  # best first
        assert np.abs(np.diff(want_s)).min() > 1e-3  # no near-ties here, so the order is exact too
        assert groups[row].tolist() == want_g.tolist()


def test_outputs_are_distinct_unmasked_catalogue_titles_with_narrow_beams(tiny):
    model, tok = tiny
    trie = build_title_trie(tok, GROUPS.titles)
    prompts = _prompts(tok, HISTORIES)
    masked = [GROUPS.group_index(h).tolist() for h in HISTORIES]
    groups, scores = constrained_search(model, prompts, trie, 20, beams=3, masked_groups=masked,
                                        pad_token_id=tok.pad_token_id, max_widen=10)  # widened until all found
    for row in range(len(prompts)):
        got = groups[row][groups[row] >= 0].tolist()
        assert len(got) == len(set(got)) == min(20, len(GROUPS) - len(set(masked[row])))  # distinct, all found
        assert all(0 <= g < len(GROUPS) for g in got)  # always a catalogue title
        assert not set(got) & set(masked[row])  # history masked ("Tetris 0" masks ids 4 and 32 alike)
        assert np.all(np.isfinite(scores[row][: len(got)])) and np.all(scores[row][: len(got)] <= 0)


def test_k_larger_than_the_reachable_titles_is_padded(tiny):
    model, tok = tiny
    titles = ["Halo", "Doom", "Myst"]
    trie = build_title_trie(tok, titles)
    prompt = _prompts(tok, [[0]])
    groups, scores = constrained_search(model, prompt, trie, 5, beams=5, masked_groups=[[1]],
                                        pad_token_id=tok.pad_token_id)
    assert sorted(groups[0][:2].tolist()) == [0, 2] and groups[0][2:].tolist() == [-1, -1, -1]
    assert np.isneginf(scores[0][2:]).all()


def test_batching_does_not_change_the_result(tiny):
    model, tok = tiny
    trie = build_title_trie(tok, GROUPS.titles)
    prompts = _prompts(tok, HISTORIES)  # different lengths: left padding inside a batch
    one = constrained_search(model, prompts, trie, 10, beams=5, batch_users=1, pad_token_id=tok.pad_token_id)
    many = constrained_search(model, prompts, trie, 10, beams=5, batch_users=4, pad_token_id=tok.pad_token_id)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_allclose(one[1], many[1], atol=1e-4)


def test_length_normalisation_ranks_by_mean_log_prob(tiny):
    model, tok = tiny
    trie = build_title_trie(tok, GROUPS.titles)
    prompt = _prompts(tok, [[0, 1]])
    seqs = response_sequences(tok, GROUPS.titles)
    total = sequence_log_likelihoods(model, prompt[0], seqs, pad_token_id=tok.pad_token_id)
    mean = total / np.array([len(s) for s in seqs])
    groups, scores = constrained_search(model, prompt, trie, 5, beams=len(GROUPS), length_norm=1.0,
                                        pad_token_id=tok.pad_token_id)
    np.testing.assert_allclose(scores[0], np.sort(mean)[::-1][:5], atol=1e-4)


def test_peft_model_runs_with_adapters_on(tiny):
    from peft import LoraConfig, get_peft_model

    _, tok = tiny
    model = get_peft_model(build_tiny_model(tok, hidden=32, layers=2, heads=2, seed=0),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    trie = build_title_trie(tok, GROUPS.titles)
    groups, _ = constrained_search(model, _prompts(tok, HISTORIES[:2]), trie, 5, beams=5,
                                   pad_token_id=tok.pad_token_id)
    assert (groups >= 0).all() and model.training  # train mode restored


def test_bad_arguments_are_clear_errors(tiny):
    model, tok = tiny
    trie = build_title_trie(tok, GROUPS.titles)
    with pytest.raises(ConstrainedError, match="k=0"):
        constrained_search(model, [[1, 2]], trie, 0, 5)
    with pytest.raises(ConstrainedError, match="masked_groups"):
        constrained_search(model, [[1, 2]], trie, 3, 5, masked_groups=[[], []])
    with pytest.raises(ConstrainedError, match="length_norm"):
        constrained_search(model, [[1, 2]], trie, 3, 5, length_norm=-1)


# --- the prior ---------------------------------------------------------------


def test_rerank_with_prior_on_hand_made_scores():
    groups = np.array([[3, 1, 2, -1]])
    scores = np.array([[-1.0, -2.0, -3.0, -np.inf]])
    prior = np.array([[-0.5, -4.0, -3.0, 0.0]])
    g, s = rerank_with_prior(groups, scores, prior, 1.0, 3)  # corrected: -0.5, 2.0, 0.0
    assert g.tolist() == [[1, 2, 3]] and s.tolist() == [[2.0, 0.0, -0.5]]
    g0, _ = rerank_with_prior(groups, scores, prior, 0.0, 4)
    assert g0.tolist() == [[3, 1, 2, -1]]


def test_ranker_with_prior_reorders_by_corrected_score(tiny, tmp_path):
    model, tok = tiny
    neutral = prompt_token_ids(tok, build_prompt([]))
    ranker = ConstrainedRanker.build(model, tok, GROUPS.titles, neutral, beams=len(GROUPS), prior_weight=1.0,
                                     prior_cache_file=tmp_path / "prior.json", model_key="tiny")
    prompt = _prompts(tok, [[0, 1]])
    groups, scores = ranker.rank(prompt, None, 5)
    seqs = response_sequences(tok, GROUPS.titles)
    raw = sequence_log_likelihoods(model, prompt[0], seqs, pad_token_id=tok.pad_token_id)
    prior = sequence_log_likelihoods(model, neutral, seqs, pad_token_id=tok.pad_token_id)
    corrected = raw - prior
    np.testing.assert_allclose(scores[0], corrected[groups[0]], atol=2e-4)  # each score is raw - prior
    assert np.all(np.diff(scores[0]) <= 0)
    # the pool holds at least the exact raw top-5, so the result is at least as good as re-ranking those
    raw_top = np.lexsort((np.arange(len(seqs)), -raw))[:5]
    assert scores[0][0] >= corrected[raw_top].max() - 2e-4
    assert list(groups[0]) != list(raw_top)  # the prior changed the list
    # the cache file holds the computed priors and is reused by a ranker with the same key
    again = ConstrainedRanker.build(model, tok, GROUPS.titles, neutral, beams=len(GROUPS), prior_weight=1.0,
                                    prior_cache_file=tmp_path / "prior.json", model_key="tiny")
    assert again.prior is not None and len(again.prior.values) >= 5
    other = ConstrainedRanker.build(model, tok, GROUPS.titles, neutral, beams=len(GROUPS), prior_weight=1.0,
                                    prior_cache_file=tmp_path / "prior.json", model_key="another model")
    assert other.prior is not None and other.prior.values == {}


def test_extra_titles_come_after_the_unchanged_top_k(tiny):
    model, tok = tiny
    trie = build_title_trie(tok, GROUPS.titles)
    prompts = _prompts(tok, HISTORIES)
    top, top_s = constrained_search(model, prompts, trie, 5, beams=4, pad_token_id=tok.pad_token_id)
    wide, wide_s = constrained_search(model, prompts, trie, 5, beams=4, pad_token_id=tok.pad_token_id, extra=6)
    assert wide.shape == (len(prompts), 11)
    np.testing.assert_array_equal(wide[:, :5], top)
    for row in range(len(prompts)):
        got = wide[row][wide[row] >= 0]
        assert len(got) == len(set(got.tolist())) > 5
        assert np.all(np.diff(wide_s[row][: len(got)]) <= 0)


# --- the fast path against the plain one -----------------------------------


def test_child_csr_lists_each_nodes_children_in_dict_order(tiny):
    _, tok = tiny
    trie = build_title_trie(tok, GROUPS.titles)
    start, token, child, n_terminal = trie.child_csr()
    for node in range(len(trie)):
        kids = trie.children[node]
        assert token[start[node]:start[node + 1]].tolist() == list(kids)
        assert child[start[node]:start[node + 1]].tolist() == list(kids.values())
        assert n_terminal[node] == len(trie.terminal[node])


@pytest.fixture(scope="module")
def tied(tiny):
    """The tiny model with tokens A and B made indistinguishable (same embedding, same output row), and
    a catalogue where titles differ only by A <-> B or are the same sequence twice: exact score ties
    between different trie nodes and between groups, which only the tie rules order."""
    import copy

    model, tok = tiny
    model = copy.deepcopy(model)
    a, b = 40, 41
    with torch.no_grad():
        model.get_input_embeddings().weight[b] = model.get_input_embeddings().weight[a]
        model.lm_head.weight[b] = model.lm_head.weight[a]
    eos = tok.eos_token_id
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(14):
        body = rng.choice([a, 50, 60, 70, 80], size=int(rng.integers(1, 5))).tolist()
        seqs.append(body + [eos])
        if a in body:  # its twin: the first A written as B
            twin = list(body)
            twin[twin.index(a)] = b
            seqs.append(twin + [eos])
    seqs.append(list(seqs[0]))  # the same sequence as group 0: a tie between groups at one node
    seqs = [list(s) for s in dict.fromkeys(map(tuple, seqs[:-1]))] + [seqs[-1]]  # distinct, then the duplicate
    return model, tok, seqs


def test_search_orders_exact_ties_like_brute_force(tied):
    model, tok, seqs = tied
    trie = TitleTrie.from_sequences(seqs)
    prompts = _prompts(tok, HISTORIES[:3])
    masked = [[1], [], [2, 3]]
    k = len(seqs)  # the whole catalogue: every tie is inside the list
    groups, _ = constrained_search(model, prompts, trie, k, beams=len(seqs), masked_groups=masked,
                                   batch_users=2, pad_token_id=tok.pad_token_id)
    twins = 0
    for row, prompt in enumerate(prompts):
        brute = sequence_log_likelihoods(model, prompt, seqs, pad_token_id=tok.pad_token_id)
        order = [g for g in np.lexsort((np.arange(len(seqs)), -brute)) if g not in masked[row]]
        gaps = np.abs(np.diff(brute[order]))
        twins += int((gaps == 0).sum())
        assert np.all((gaps == 0) | (gaps > 1e-4))  # exact ties or clear gaps: the order is well defined
        assert groups[row][: len(order)].tolist() == order  # ties: the smaller group first
    assert twins >= 3  # the catalogue does hold exact ties


@pytest.mark.parametrize("beams,batch_users", [(2, 1), (3, 3), (5, 2)])
def test_shared_prompt_cache_gives_bit_identical_results(tied, monkeypatch, beams, batch_users):
    """The search with each prompt's KV cache shared by its beams equals, bit for bit, the search
    with a plain per-beam cache (the implementation before), also with narrow beams where
    pruning among tied beams decides which titles are found."""
    import fellrec_flwr.eval.constrained as constrained

    model, tok, seqs = tied
    trie = TitleTrie.from_sequences(seqs)
    prompts = _prompts(tok, HISTORIES)
    masked = [[1], [], [2, 3], [0]]
    new = constrained_search(model, prompts, trie, 6, beams, masked, batch_users=batch_users,
                             pad_token_id=tok.pad_token_id, extra=3)
    shared = []
    monkeypatch.setattr(constrained, "_share_prompt", lambda cache: shared.append(cache) or False)
    old = constrained_search(model, prompts, trie, 6, beams, masked, batch_users=batch_users,
                             pad_token_id=tok.pad_token_id, extra=3)
    assert shared  # the plain path did run
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_array_equal(new[1], old[1])  # scores equal exactly, not approximately
    assert (new[0][:, :3] >= 0).all()


def test_teacher_forced_scores_are_bit_identical_with_the_shared_prompt_cache(tiny, monkeypatch):
    import fellrec_flwr.eval.constrained as constrained

    model, tok = tiny
    prompt = _prompts(tok, [[0, 1]])[0]
    seqs = response_sequences(tok, GROUPS.titles)
    new = sequence_log_likelihoods(model, prompt, seqs, batch_size=7, pad_token_id=tok.pad_token_id)
    monkeypatch.setattr(constrained, "_share_prompt", lambda cache: False)
    old = sequence_log_likelihoods(model, prompt, seqs, batch_size=7, pad_token_id=tok.pad_token_id)
    np.testing.assert_array_equal(new, old)
