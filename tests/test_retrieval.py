"""The retrieval head (RecFormer-style): scoring maths, encoding, learning, ranking, a federated run."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from fellrec_flwr.config import STRATEGIES, ConfigError, LoraSettings, ModelConfig, RetrievalSettings, TrainSettings, from_run_config
from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.model.lora_state import get_lora_state, set_lora_state
from fellrec_flwr.model.loading import add_lora, load_base_model
from fellrec_flwr.data.prompts import history_input
from fellrec_flwr.model.retrieval import (
    RetrievalError,
    batch_columns,
    evaluate_retrieval,
    full_catalogue_loss,
    history_column_mask,
    item_vectors,
    pool,
    retrieval_loss,
    score_matrix,
    train_retrieval,
    user_vectors,
)

# ids 40 and 41 repeat the titles of 0 and 1: duplicate titles form one group
TITLES = {**{i: f"Quest {chr(65 + i % 26)}{i} - Deluxe" for i in range(40)}, 40: "Quest A0 - Deluxe",
          41: "Quest B1 - Deluxe"}
SETTINGS = RetrievalSettings()


@dataclass(frozen=True)
class Ex:
    user_id: int
    history: tuple[int, ...]
    target: int


def sequences(n: int, seed: int) -> list[Ex]:
    """A learnable catalogue walk: each user plays consecutive items; the next one is the target."""
    rng = np.random.default_rng(seed)
    out = []
    for user in range(n):
        start, length = int(rng.integers(0, 40)), int(rng.integers(2, 6))
        items = [(start + k) % 40 for k in range(length + 1)]
        out.append(Ex(user, tuple(items[:-1]), items[-1]))
    return out


TRAIN = sequences(96, seed=0)


@pytest.fixture(scope="module")
def tiny(work_dir):
    model, tok = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
    return add_lora(model, LoraSettings(), seed=1), tok


# ---------------------------------------------------------------- pure pieces


def test_pool_mean_and_last_match_a_direct_computation():
    hidden = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([2, 4])
    mean = pool(hidden, lengths, "mean")
    last = pool(hidden, lengths, "last")
    for row, n in enumerate([2, 4]):
        expected_mean = hidden[row, :n].mean(0)
        torch.testing.assert_close(mean[row], expected_mean / expected_mean.norm())
        torch.testing.assert_close(last[row], hidden[row, n - 1] / hidden[row, n - 1].norm())
    with pytest.raises(RetrievalError, match="pooling"):
        pool(hidden, lengths, "max")


def test_batch_columns_share_a_column_for_a_repeated_target_and_skip_known_extras():
    columns, labels = batch_columns([5, 2, 5, 7], [2, 9])
    assert columns == [5, 2, 7, 9]
    assert labels == [0, 1, 0, 2]


def test_history_mask_hides_history_negatives_but_never_the_target():
    columns, labels = [5, 2, 7], [0, 1]
    mask = history_column_mask(columns, [[2, 5, 8], [2]], labels)
    # user 0: group 2 is history (masked), 5 is its target (kept); user 1: 2 is its own target
    assert mask.tolist() == [[False, True, False], [False, False, False]]


def test_retrieval_loss_is_cross_entropy_of_cosines_over_temperature():
    gen = torch.Generator().manual_seed(1)
    users = torch.nn.functional.normalize(torch.randn(3, 4, generator=gen), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(4, 4, generator=gen), dim=-1)
    labels = torch.tensor([0, 2, 3])
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 0] = True
    got = retrieval_loss(users, items, labels, 0.05, mask)
    expected = 0.0
    for u in range(3):
        logits = [float(users[u] @ items[i]) / 0.05 for i in range(4)]
        allowed = [i for i in range(4) if not mask[u, i]]
        expected += -logits[labels[u]] + np.log(sum(np.exp(logits[i]) for i in allowed))
    assert got.item() == pytest.approx(expected / 3, rel=1e-5)
    with pytest.raises(RetrievalError, match="temperature"):
        score_matrix(users, items, 0.0)


def test_full_catalogue_loss_masks_history_but_not_the_target():
    users = np.array([[1.0, 0.0], [0.0, 1.0]])
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    masks = np.array([[False, True, False], [False, True, True]])  # user 1's target (1) is in its history
    got = full_catalogue_loss(users, items, np.array([0, 1]), masks, 0.5)
    logits = (users @ items.T) / 0.5
    expected0 = -logits[0, 0] + np.log(np.exp(logits[0, 0]) + np.exp(logits[0, 2]))
    expected1 = -logits[1, 1] + np.log(np.exp(logits[1, 0]) + np.exp(logits[1, 1]))
    np.testing.assert_allclose(got, [expected0, expected1])


# ---------------------------------------------------------------- the tiny model


def _direct_vector(model, tok, text: str, pooling: str) -> np.ndarray:
    """One text alone through the LoRA model (no padding anywhere), pooled by hand."""
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(text, add_special_tokens=False)["input_ids"]
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    hidden = out.hidden_states[-1][0]  # after the final norm
    vec = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return (vec / vec.norm()).numpy()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_scores_equal_a_direct_computation(tiny, pooling):
    model, tok = tiny
    settings = RetrievalSettings(pooling=pooling)
    groups = TitleGroups.from_titles(TITLES)
    items = item_vectors(model, tok, groups, settings, max_length=64, batch_size=7)
    histories = [[TITLES[3], TITLES[4]], [TITLES[10]], [TITLES[i] for i in range(20, 29)]]
    users = user_vectors(model, tok, histories, settings, max_length=256, batch_size=2)
    direct_items = np.stack([_direct_vector(model, tok, f'"{t}"', pooling) for t in groups.titles])
    direct_users = np.stack([_direct_vector(model, tok, history_input(h), pooling) for h in histories])
    np.testing.assert_allclose(items, direct_items, atol=1e-5)
    np.testing.assert_allclose(users, direct_users, atol=1e-5)
    np.testing.assert_allclose(score_matrix(users, items, 0.05), direct_users @ direct_items.T / 0.05, atol=1e-3)


def test_training_lowers_the_loss_on_a_toy_set(tiny):
    model, tok = tiny
    start = get_lora_state(model)
    cfg = TrainSettings(lr=3e-3, batch_size=16, local_epochs=4, max_length=128)
    try:
        before, _ = evaluate_retrieval(model, tok, TRAIN, TITLES, SETTINGS, 128)
        result = train_retrieval(model, tok, TRAIN, TITLES, cfg, RetrievalSettings(negatives=4), seed=3,
                                 progress=False)
        after, _ = evaluate_retrieval(model, tok, TRAIN, TITLES, SETTINGS, 128)
    finally:
        trained = get_lora_state(model)
        set_lora_state(model, start)
    assert result.steps == 4 * 6 and result.num_examples == len(TRAIN) and np.isfinite(result.loss)
    assert after["eval-loss"] < before["eval-loss"] - 0.1, (before, after)
    assert any(not np.array_equal(trained[k], start[k]) for k in start)


def test_training_is_reproducible_and_fedprox_pulls_towards_the_received_weights(tiny):
    model, tok = tiny
    start = get_lora_state(model)
    cfg = TrainSettings(lr=3e-3, batch_size=16, max_length=128)

    def run(mu: float) -> dict:
        set_lora_state(model, start)
        train_retrieval(model, tok, TRAIN[:32], TITLES, cfg, SETTINGS, seed=5, proximal_mu=mu, progress=False)
        return get_lora_state(model)

    try:
        a, b, prox = run(0.0), run(0.0), run(1e4)
    finally:
        set_lora_state(model, start)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    drift = lambda s: sum(float(np.sum((s[k] - start[k]) ** 2)) for k in start)  # noqa: E731
    assert drift(prox) < drift(a)


def test_topk_are_distinct_valid_items_with_history_masked(tiny):
    model, tok = tiny
    examples = [Ex(0, (0, 1, 2), 3), Ex(1, (40,), 5), Ex(2, tuple(range(5, 15)), 41), Ex(3, (7,), 0)]
    metrics, rows = evaluate_retrieval(model, tok, examples, TITLES, SETTINGS, 128, ks=(10, 38))
    groups = TitleGroups.from_titles(TITLES)
    assert metrics["num-users"] == 4 and set(metrics) >= {"recall@10", "ndcg@38", "eval-loss"}
    for ex, row in zip(examples, rows):
        top = row["top10"]
        assert len(top) == 10 and all(i in TITLES for i in top)
        assert len({TITLES[i] for i in top}) == 10  # distinct titles, each by its smallest id
        assert set(top) <= set(groups.rep_ids.tolist())
        history_titles = {TITLES[i] for i in ex.history}
        assert not history_titles & {TITLES[i] for i in top}
    # user 1 has item 40 ("Quest A0"): item 0 shares that title, so it is masked too
    assert 0 not in rows[1]["top10"]
    # with k = 38 every unmasked group is listed: the target is found exactly when not masked
    assert rows[0]["target_rank"] >= 0 and rows[1]["target_rank"] >= 0
    assert rows[3]["target_masked"] is False


def test_errors_name_the_problem(tiny):
    model, tok = tiny
    with pytest.raises(RetrievalError, match="no examples"):
        evaluate_retrieval(model, tok, [], TITLES, SETTINGS, 128)
    with pytest.raises(Exception, match="no examples"):
        train_retrieval(model, tok, [], TITLES, TrainSettings(), SETTINGS, seed=0, progress=False)
    with pytest.raises(ConfigError, match="model.head"):
        from_run_config({"model.head": "ranking"})
    with pytest.raises(ConfigError, match="retrieval.temperature"):
        from_run_config({"retrieval.temperature": 0})
    with pytest.raises(ConfigError, match="split"):
        from_run_config({"model.head": "retrieval", "split.enabled": True})


# ---------------------------------------------------------------- a federated run


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path_factory.getbasetemp() / "fellrec-cache"))


@pytest.mark.parametrize("strategy", STRATEGIES)  # every strategy only sees LoRA arrays
def test_inprocess_federated_run_with_the_retrieval_head(tmp_path, private_cache, strategy):
    from flwr.app import Context, RecordDict

    import server_app.app as server
    from client_app.app import app as client_app
    from fellrec_flwr.inprocess_grid import InProcessGrid

    run_config = {
        "data.num-clients": 2, "min-clients": 2, "data.train-samples": 48, "data.valid-users": 16,
        "data.test-users": 16, "data.bpr-epochs": 2, "model.tiny-layers": 2, "model.tiny-vocab": 800,
        "train.batch-size": 8, "model.tiny-pretrain-prompts": 0, "model.head": "retrieval",
        "retrieval.negatives": 4, "strategy": strategy, "num-server-rounds": 2, "out-dir": str(tmp_path),
        "run-name": "r",
    }
    grid = InProcessGrid(client_app, 2, run_config)
    server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["split"] == "test" and set(summary["per_client"]) == {"0", "1"}
    rows = pd.read_csv(tmp_path / "r" / "metrics.csv")
    test = rows[rows["split"] == "test"]
    assert {"recall@10", "ndcg@20", "eval-loss"} <= set(test["metric"])
    values = test[test["metric"].str.startswith(("recall@", "ndcg@"))]["value"]
    assert ((values >= 0) & (values <= 1)).all()
    train_loss = rows[rows["metric"] == "train-loss"]["value"]
    assert len(train_loss) >= 4 and np.isfinite(train_loss).all()


def test_cached_frozen_prefix_gives_the_same_vectors(work_dir):
    from fellrec_flwr.model.retrieval import encode_all_states, frozen_prefix_layers, item_token_ids, prefix_states

    base, tok = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
    model = add_lora(base, LoraSettings(layers="3"), seed=2)  # the tiny model has 4 layers
    with torch.no_grad():  # a non-zero adapter, so the top layers' LoRA matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    groups = TitleGroups.from_titles(TITLES)
    start = frozen_prefix_layers(model)
    assert start == 3
    states = prefix_states(model, tok, item_token_ids(tok, groups.titles, 64), start, batch_size=5)
    via_prefix = encode_all_states(model, states, start, "mean", batch_size=3)
    np.testing.assert_allclose(via_prefix, item_vectors(model, tok, groups, SETTINGS, 64), atol=1e-5)


def test_training_on_cached_prefix_states_equals_full_model_training(work_dir):
    """Same seed, same batches: the states trainer's step losses and adapter match the full-model trainer's."""
    from fellrec_flwr.data.collate import lookup_titles
    from fellrec_flwr.model.retrieval import (frozen_prefix_layers, item_token_ids, prefix_states,
                                              train_retrieval_states, user_token_ids)

    base, tok = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
    model = add_lora(base, LoraSettings(layers="3"), seed=4)  # the tiny model has 4 layers
    start = frozen_prefix_layers(model)
    assert start == 3
    groups = TitleGroups.from_titles(TITLES)
    examples = TRAIN[:40]
    cfg = TrainSettings(lr=3e-3, batch_size=8, local_epochs=2, max_length=128)
    settings = RetrievalSettings(negatives=4)
    init = get_lora_state(model)
    full_curve: list[float] = []
    full = train_retrieval(model, tok, examples, TITLES, cfg, settings, seed=7, progress=False, groups=groups,
                           on_step=lambda step, loss: full_curve.append(loss))
    full_state = get_lora_state(model)
    set_lora_state(model, init)
    users = prefix_states(model, tok, [user_token_ids(tok, lookup_titles(ex.history, TITLES), 128)
                                       for ex in examples], start, batch_size=7)
    items = prefix_states(model, tok, item_token_ids(tok, groups.titles, 128), start, batch_size=9)
    cached_curve: list[float] = []
    cached = train_retrieval_states(
        model, start, users, groups.group_index([ex.target for ex in examples]).tolist(),
        [groups.group_index(ex.history).tolist() for ex in examples], items, cfg, settings, seed=7,
        on_step=lambda step, loss: cached_curve.append(loss))
    cached_state = get_lora_state(model)
    set_lora_state(model, init)
    assert cached.steps == full.steps == 2 * 5
    # the first step starts from the same weights: the loss on the same batch agrees to float rounding
    assert abs(cached_curve[0] - full_curve[0]) < 1e-4, (cached_curve[0], full_curve[0])
    np.testing.assert_allclose(cached_curve, full_curve, rtol=1e-3, atol=1e-3)
    assert full_curve[-1] != full_curve[0]  # it did train
    for key in init:
        np.testing.assert_allclose(cached_state[key], full_state[key], atol=1e-4)
    with pytest.raises(RetrievalError, match="states, .* targets"):
        train_retrieval_states(model, start, users, [0], [[]], items, cfg, settings, seed=7)
    with pytest.raises(RetrievalError, match="stale"):
        train_retrieval_states(model, start + 1, users[:1], [0], [[]], items, cfg, settings, 7)


def test_popularity_grounded_ranks_interpolate_between_the_head_and_popularity():
    from fellrec_flwr.eval.baselines import FittedBaselines, group_counts
    from fellrec_flwr.eval.grounding import Catalogue
    from fellrec_flwr.eval.metrics import target_ranks
    from fellrec_flwr.model.retrieval import popularity_grounded_ranks

    groups = TitleGroups.from_titles(TITLES)
    rng = np.random.default_rng(5)
    users = rng.normal(size=(30, 8))
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    items = rng.normal(size=(len(groups), 8))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    examples = sequences(30, seed=9)
    histories = [list(ex.history) for ex in examples]
    masks = groups.history_mask(histories)
    targets = groups.group_index([ex.target for ex in examples])
    counts = group_counts([list(ex.history) for ex in TRAIN], groups)
    # gamma = 0: exactly the cosine ranking the retrieval head's evaluation uses
    ranked = Catalogue(groups, items.astype(np.float32)).rank(users.astype(np.float32), histories, 10)
    expected = target_ranks(ranked, np.array([ex.target for ex in examples]), canonical=groups.canonical)
    got = popularity_grounded_ranks(users, items, 0.05, 0.0, counts, masks, targets, 10)
    np.testing.assert_array_equal(got, expected)
    assert (got >= 0).any() and (got == -1).any()
    # equal cosines for every item: the popularity term alone decides, ties by group index = the baseline
    flat = np.tile(items[:1], (len(groups), 1))
    fitted = FittedBaselines.fit([list(ex.history) for ex in TRAIN], TITLES)
    popular = fitted.ranks("popularity", examples, 10)
    np.testing.assert_array_equal(popularity_grounded_ranks(users, flat, 0.05, 1.0, counts, masks, targets, 10),
                                  popular)
    assert not np.array_equal(popular, expected)
    with pytest.raises(RetrievalError, match="gamma"):
        popularity_grounded_ranks(users, items, 0.05, -1.0, counts, masks, targets, 10)
