"""evaluate_recommender end to end on the tiny model, and with a perfect-oracle generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from fellrec_flwr.config import EvalSettings
from fellrec_flwr.eval.evaluate import evaluate_recommender
from fellrec_flwr.eval.grounding import Catalogue
from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer


@dataclass(frozen=True)
class Ex:
    user_id: int
    history: tuple[int, ...]
    target: int


WORDS = ["Mario", "Zelda", "Halo", "Doom", "Tetris", "Sonic", "Kirby", "Metroid", "Portal", "Myst"]
TITLES = {i: f"{w} {i // len(WORDS)}" for i, w in enumerate(WORDS * 3)}
TITLES[30] = TITLES[4]  # "Tetris 0" twice: ids 4 and 30
EXAMPLES = [
    Ex(0, (0, 1, 2), 3),
    Ex(1, (5, 6), 30),  # target 30 is grounded through its title group (reported as id 4)
    Ex(2, (7,), 8),
    Ex(3, (4, 9, 10), 30),  # the target's title is in the history: masked, always a miss
    Ex(4, (11, 12, 13, 14), 15),
]
EVAL = EvalSettings(num_beams=2, max_new_tokens=8, batch_size=2, decoding="beam-l2")  # the paper's generate + ground path
KEYS = {"recall@10", "ndcg@10", "recall@20", "ndcg@20", "num-users", "valid-title-rate"}


def simple_prompt(history_titles):
    return "Played: " + "; ".join(history_titles) + "\n### Response:\n"


def simple_extract(text):
    return text.strip().strip('"').strip()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = list(TITLES.values()) + [simple_prompt(["A", "B"])]
    tok = train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tok")
    model = build_tiny_model(tok, hidden=32, layers=2, heads=2, seed=0)
    return model, tok, Catalogue.build(model, tok, TITLES, progress=False)


def _check_sane(metrics, rows):
    assert set(metrics) == KEYS
    assert metrics["num-users"] == len(EXAMPLES)
    for key in KEYS - {"num-users"}:
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["recall@10"] <= metrics["recall@20"] and metrics["ndcg@10"] <= metrics["ndcg@20"]
    assert [r["user_id"] for r in rows] == [ex.user_id for ex in EXAMPLES]
    for row, ex in zip(rows, EXAMPLES):
        assert len(row["top10"]) == 10 and -1 <= row["target_rank"] < 20
        assert not set(row["top10"]) & set(ex.history)  # history never recommended


def test_plain_model_end_to_end(tiny):
    model, tok, cat = tiny
    model.train()
    metrics, rows = evaluate_recommender(model, tok, EXAMPLES, TITLES, cat, EVAL, simple_prompt, progress=False,
                                         extract_fn=simple_extract)
    _check_sane(metrics, rows)
    assert model.training  # train mode restored
    assert rows[3]["target_masked"] and rows[3]["target_rank"] == -1


def test_peft_model_with_the_project_prompt(tiny):
    from peft import LoraConfig, get_peft_model

    _, tok, cat = tiny
    model = get_peft_model(build_tiny_model(tok, hidden=32, layers=2, heads=2, seed=0),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    metrics, rows = evaluate_recommender(model, tok, EXAMPLES, TITLES, cat, EVAL, progress=False)  # prompts.py defaults
    _check_sane(metrics, rows)


def test_perfect_oracle_ranks_every_reachable_target_first(tiny):
    model, tok, cat = tiny
    answers = iter(f'"{TITLES[ex.target]}"' for ex in EXAMPLES)

    def oracle(prompts):
        return [next(answers) for _ in prompts]

    metrics, rows = evaluate_recommender(model, tok, EXAMPLES, TITLES, cat, EVAL, simple_prompt, progress=False,
                                         generate_fn=oracle, extract_fn=simple_extract)
    assert [r["target_rank"] for r in rows] == [0, 0, 0, -1, 0]  # user 3: target title is in the history
    assert rows[1]["top10"][0] == 4  # the "Tetris 0" group is reported by its smallest id
    assert metrics["recall@10"] == pytest.approx(4 / 5) and metrics["ndcg@20"] == pytest.approx(4 / 5)
    assert metrics["valid-title-rate"] == 1.0


def test_injected_embedding_and_ndcg_value(tiny):
    """With an injected query embedding, the target's rank equals a brute-force L2 ranking
    (history masked) and NDCG is exactly 1/log2(rank+2)."""
    model, tok, cat = tiny
    ex = EXAMPLES[0]
    history_groups = set(cat.groups.group_index(ex.history).tolist())
    target_group = cat.groups.group_index([ex.target])[0]

    def brute_rank(query):
        dist = np.linalg.norm(cat.embeddings.astype(np.float64) - query, axis=1)
        order = [g for g in np.argsort(dist, kind="stable") if g not in history_groups]
        return order.index(target_group)

    # A query sitting on another title's embedding, for which the target is not first.
    query = next(cat.embeddings[g] for g in range(len(cat))
                 if g not in history_groups and 1 <= brute_rank(cat.embeddings[g]) < 20)
    metrics, rows = evaluate_recommender(model, tok, [ex], TITLES, cat, EVAL, simple_prompt, progress=False,
                                         generate_fn=lambda p: ["x"] * len(p), extract_fn=simple_extract,
                                         embed_fn=lambda texts: np.stack([query] * len(texts)))
    expected = brute_rank(query)
    assert rows[0]["target_rank"] == expected
    assert metrics["ndcg@20"] == pytest.approx(1 / math.log2(expected + 2))
    assert metrics["recall@20"] == 1.0 and metrics["recall@10"] == float(expected < 10)
    assert metrics["valid-title-rate"] == 0.0


def test_unknown_target_is_a_clear_error(tiny):
    model, tok, cat = tiny
    with pytest.raises(ValueError, match="not in the catalogue"):
        evaluate_recommender(model, tok, [Ex(0, (1,), 999)], TITLES, cat, EVAL, simple_prompt, progress=False)


# --- eval.decoding = 'constrained' -------------------------------------------------


def test_constrained_decoding_lists_distinct_catalogue_titles_with_history_masked(tiny):
    from dataclasses import replace

    model, tok, cat = tiny
    cfg = replace(EVAL, decoding="constrained", constrained_beams=4)
    metrics, rows = evaluate_recommender(model, tok, EXAMPLES, TITLES, cat, cfg, simple_prompt, progress=False)
    _check_sane(metrics, rows)
    assert metrics["valid-title-rate"] == 1.0  # the top title is always a catalogue title
    for row, ex in zip(rows, EXAMPLES):
        ids = [i for i in row["top10"] if i >= 0]
        assert len(ids) == 10 and len({TITLES[i] for i in ids}) == 10  # distinct titles
        assert row["generated"] == TITLES[ids[0]]
        masked_titles = {TITLES[i] for i in ex.history}
        assert not {TITLES[i] for i in ids} & masked_titles  # history title groups masked
        assert all(i == min(j for j in TITLES if TITLES[j] == TITLES[i]) for i in ids)  # group representative
    assert rows[3]["target_masked"] and rows[3]["target_rank"] == -1


def test_constrained_ranking_equals_the_exact_likelihood_order(tiny):
    """With beams >= titles the list is the catalogue sorted by log-likelihood (brute force)."""
    from dataclasses import replace

    from fellrec_flwr.data.collate import prompt_token_ids
    from fellrec_flwr.eval.constrained import response_sequences, sequence_log_likelihoods

    model, tok, cat = tiny
    ex = EXAMPLES[0]
    cfg = replace(EVAL, decoding="constrained", constrained_beams=len(cat))
    _, rows = evaluate_recommender(model, tok, [ex], TITLES, cat, cfg, simple_prompt, progress=False)
    prompt = prompt_token_ids(tok, simple_prompt([TITLES[i] for i in ex.history]))
    scores = sequence_log_likelihoods(model, prompt, response_sequences(tok, cat.groups.titles),
                                      pad_token_id=tok.pad_token_id)
    masked = set(cat.groups.group_index(ex.history).tolist())
    order = [g for g in np.lexsort((np.arange(len(cat)), -scores)) if g not in masked]
    assert rows[0]["top10"] == cat.groups.rep_ids[order[:10]].tolist()


def test_unknown_decoding_is_a_clear_error(tiny):
    from dataclasses import replace

    model, tok, cat = tiny
    with pytest.raises(ValueError, match="eval.decoding"):
        evaluate_recommender(model, tok, EXAMPLES[:1], TITLES, cat, replace(EVAL, decoding="greedy"), simple_prompt,
                             progress=False)
