"""The item-token head (fellrec_flwr/model/item_head.py) against direct computations on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fellrec_flwr.config import ItemHeadSettings, LoraSettings, TrainSettings
from fellrec_flwr.data.prepared import Example
from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.model import item_head as ih

TITLES = {0: "Alpha", 1: "Beta", 2: "Gamma", 3: "Alpha", 4: "Delta", 5: "Epsilon", 6: "Zeta", 7: "Eta"}
LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")


def tiny_config(layers: int = 3):
    from fellrec_flwr.model.tiny import tiny_config as cfg

    config = cfg(50, hidden=32, layers=layers, heads=4)
    config._attn_implementation = "sdpa"
    return config


def head_model(k: int = 2, seed: int = 0, groups: int = 7, trained: bool = True):
    """An item head over random frozen layers and random item vectors."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = tiny_config()
    torch.manual_seed(123)
    layers = [LlamaDecoderLayer(config, i).state_dict() for i in range(k)]
    for state in layers:
        for tensor in state.values():
            tensor.normal_(0, 0.2)
    norm = {"weight": torch.rand(config.hidden_size) + 0.5}
    vectors = torch.randn(groups, config.hidden_size)
    model = ih.build_item_model(config, layers, norm, vectors, ItemHeadSettings(layers=k, id_dim=8), LORA, seed)
    if trained:  # item_out starts at zero (every item equally likely); give the scores some shape
        with torch.no_grad():
            model.get_base_model().item_out.weight.normal_(0, 0.3)
            model.get_base_model().item_in.weight.normal_(0, 0.3)
    return model


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n,window", [(2, 3), (5, 3), (12, 4), (9, 1), (30, 10), (11, 10)])
def test_chunks_cover_every_target_once_with_the_right_history(n, window):
    seq = list(range(100, 100 + n))
    seen: dict[int, list[int]] = {}
    for inputs, targets, first in ih.sequence_chunks(seq, window):
        assert len(inputs) == len(targets) <= window
        for p in range(first, len(targets)):
            j = seq.index(targets[p])
            assert j not in seen, "a target got its loss twice"
            seen[j] = inputs[: p + 1]
    assert sorted(seen) == list(range(1, n))
    for j, history in seen.items():
        assert history == seq[j - len(history):j]  # the items right before the target, in order
        assert len(history) >= min(j, window - window // 2) and len(history) <= window
        if j <= window:
            assert len(history) == j  # the first targets see their whole prefix


def test_chunks_of_short_sequences_and_bad_window():
    assert ih.sequence_chunks([7], 5) == []
    with pytest.raises(ih.ItemHeadError, match="window"):
        ih.sequence_chunks([1, 2, 3], 0)


# --------------------------------------------------------------------------- loss and ranking, directly


def test_loss_equals_a_direct_computation_per_window():
    model = head_model()
    model.eval()
    chunks = [([1, 2, 3, 4], [2, 3, 4, 5], 1), ([6, 0], [0, 1], 0), ([3], [6], 0)]
    inputs, labels = ih.pad_chunks(chunks, model.num_groups)
    with torch.no_grad():
        total, count = ih.chunk_loss(model, inputs, labels)
        expected, n = 0.0, 0
        table = model.item_table()
        for x, y, first in chunks:
            for p in range(first, len(y)):
                # the window alone, unpadded: causality and padding must not change a position's state
                state = model(torch.tensor([x[: p + 1]]))[0, -1]
                expected += float(F.cross_entropy((state @ table.T)[None], torch.tensor([y[p]])))
                n += 1
    assert count == n == 6
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_item_table_is_projection_of_vectors_plus_id_embedding():
    model = head_model()
    base = model.get_base_model()
    with torch.no_grad():
        with torch.no_grad():  # a trained item_out, not the zero start
            base.item_out.weight.normal_()
        keys = (base.title_vectors - base.title_vectors.mean(0)) / base.title_vectors.std(0)
        direct = keys @ base.item_out.weight.T + base.id_emb.weight[:7] @ base.id_proj.weight.T
        assert torch.allclose(model.item_table(), direct, atol=1e-6)
        states = torch.randn(5, 32)
        assert torch.allclose(model.scores(states), states @ direct.T, atol=1e-5)  # never projects the catalogue
        # at the start items enter as their vectors (+ a small id part) and every item is equally likely
        start = head_model(trained=False).get_base_model()
        assert not start.item_in.weight.any() and not start.item_out.weight.any()
        index = torch.tensor([[0, 3, 7]])  # 7 = padding: a zero vector, the padding id row is zero
        assert torch.allclose(start.item_inputs(index)[0, :2], start.title_vectors[[0, 3]]
                              + start.id_emb.weight[[0, 3]] @ start.id_proj.weight.T)
        assert not start.item_inputs(index)[0, 2].any()


def test_ranking_and_eval_loss_equal_a_direct_computation():
    model = head_model(groups=7)
    groups = TitleGroups.from_titles(TITLES)  # ids 0 and 3 share a title: 7 groups
    assert len(groups) == 7
    examples = [Example(10, (0, 1), 2), Example(11, (4,), 3), Example(12, (2, 5, 6), 7), Example(13, (3,), 0)]
    metrics, rows = ih.evaluate_item_head(model, examples, groups, ks=(1, 3))
    histories = [groups.group_index(ex.history).tolist() for ex in examples]
    scores = ih.item_scores(model, histories).astype(np.float64)
    ranks, losses = [], []
    for r, ex in enumerate(examples):
        masked = set(histories[r])
        order = [g for g in np.argsort(-scores[r], kind="stable") if g not in masked]
        target = int(groups.group_index([ex.target])[0])
        ranks.append(order.index(target) if target in order and order.index(target) < 3 else -1)
        keep = [g for g in range(7) if g not in masked or g == target]
        logits = scores[r, keep]
        losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - scores[r, target])
        assert rows[r]["top10"][:3] == groups.rep_ids[order[:3]].tolist()
    assert [row["target_rank"] for row in rows] == ranks
    assert rows[3]["target_rank"] == -1 and rows[3]["target_masked"]  # target's title is in the history
    assert metrics["recall@3"] == pytest.approx(np.mean([0 <= x < 3 for x in ranks]))
    assert metrics["eval-loss"] == pytest.approx(np.mean(losses), rel=1e-9)


def test_order_of_the_history_matters():
    """The top layers see item order (rotary positions, causal attention): not a bag of items."""
    model = head_model()
    a, b = ih.item_scores(model, [[1, 2, 4]]), ih.item_scores(model, [[4, 2, 1]])
    assert not np.allclose(a, b)


def test_training_lowers_the_loss_and_moves_only_trainable_parameters():
    model = head_model(trained=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    sequences = [[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [0, 2, 4, 6, 1, 3, 5]] * 4
    cfg = TrainSettings(local_epochs=30, lr=0.01, batch_size=4)
    result = ih.train_item_head(model, sequences, cfg, ItemHeadSettings(layers=2, id_dim=8, window=4), seed=0,
                                progress=False)
    assert result.num_examples == 12 * 6  # every window of every sequence
    first = ih.train_item_head(head_model(trained=False), sequences, TrainSettings(local_epochs=1, lr=0.01, batch_size=4),
                               ItemHeadSettings(layers=2, id_dim=8, window=4), seed=0, progress=False).loss
    assert result.loss < first * 0.5
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("id_emb" in n for n in names)


def test_same_seed_same_start_and_state_travels_through_set_lora_state():
    from fellrec_flwr.model.lora_state import get_lora_state, set_lora_state

    a, b = get_lora_state(head_model(seed=3, trained=False)), get_lora_state(head_model(seed=3, trained=False))
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(k.endswith("id_emb.weight") for k in a) and any("lora_B" in k for k in a)
    c = get_lora_state(head_model(seed=4, trained=False))
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    target = head_model(seed=4, trained=False)
    set_lora_state(target, a)
    assert all(np.array_equal(get_lora_state(target)[k], a[k]) for k in a)


# --------------------------------------------------------------------------- bad input


def test_unknown_item_and_empty_history_are_named():
    model = head_model()
    groups = TitleGroups.from_titles(TITLES)
    with pytest.raises(ih.ItemHeadError, match="item id 99 is not in the catalogue"):
        ih.evaluate_item_head(model, [Example(1, (0, 99), 2)], groups)
    with pytest.raises(ih.ItemHeadError, match="empty history"):
        ih.evaluate_item_head(model, [Example(1, (), 2)], groups)
    with pytest.raises(ih.ItemHeadError, match="item id 42"):
        ih.group_sequences({5: [0, 42]}, groups)
    with pytest.raises(ih.ItemHeadError, match="user 5 has an empty training sequence"):
        ih.group_sequences({5: []}, groups)
    with pytest.raises(ih.ItemHeadError, match="item-head.layers=3 must be between 1 and 2"):
        ih.check_layers(ItemHeadSettings(layers=3), 3)


def test_config_refuses_split_and_lora_layers_with_the_item_head():
    from fellrec_flwr.config import ConfigError, from_run_config

    with pytest.raises(ConfigError, match="needs no split service"):
        from_run_config({"model.head": "item", "split.enabled": True})
    with pytest.raises(ConfigError, match="lora.layers does not apply"):
        from_run_config({"model.head": "item", "lora.layers": "1"})
    with pytest.raises(ConfigError, match="item-head.window=0 must be >= 1"):
        from_run_config({"model.head": "item", "item-head.window": 0})


# --------------------------------------------------------------------------- the cached item vectors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaMA saved as safetensors + its tokenizer: what checkpoint_for gives a process."""
    from transformers import LlamaForCausalLM

    from fellrec_flwr.model import tiny

    folder = tmp_path_factory.mktemp("ckpt")
    tok = tiny.train_tokenizer(list(TITLES.values()) * 3, 60, folder)
    config = tiny_config()
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def _loader(folder, calls):
    def load():
        from transformers import LlamaForCausalLM

        from fellrec_flwr.model import tiny

        calls.append(1)
        return LlamaForCausalLM.from_pretrained(str(folder)), tiny.load_tokenizer(folder)
    return load


def test_item_vectors_equal_a_direct_mean_over_title_tokens(checkpoint, tmp_path):
    from transformers import LlamaForCausalLM

    from fellrec_flwr.model import tiny

    groups = TitleGroups.from_titles(TITLES)
    settings = ItemHeadSettings(layers=1)
    vectors = ih.catalogue_vectors(checkpoint, groups, settings, tmp_path, _loader(checkpoint, []), progress=False)
    model, tok = LlamaForCausalLM.from_pretrained(str(checkpoint)), tiny.load_tokenizer(checkpoint)
    for g, title in enumerate(groups.titles):
        ids = [tok.bos_token_id] + tok(title, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2]  # entering layer 2 = cut
        assert np.allclose(vectors[g], hidden[0, 1:].mean(0).numpy(), atol=1e-5), title


def test_item_vector_cache_is_reused_and_invalidated(checkpoint, tmp_path):
    groups = TitleGroups.from_titles(TITLES)
    settings = ItemHeadSettings(layers=1)
    calls: list[int] = []
    first = ih.catalogue_vectors(checkpoint, groups, settings, tmp_path, _loader(checkpoint, calls), progress=False)
    again = ih.catalogue_vectors(checkpoint, groups, settings, tmp_path, _loader(checkpoint, calls), progress=False)
    assert calls == [1] and np.array_equal(first, again)  # read from the cache, no model loaded
    changed = TitleGroups.from_titles({**TITLES, 7: "Eta (Remastered)"})  # another catalogue
    ih.catalogue_vectors(checkpoint, changed, settings, tmp_path, _loader(checkpoint, calls), progress=False)
    assert len(calls) == 2
    ih.catalogue_vectors(checkpoint, groups, ItemHeadSettings(layers=2), tmp_path, _loader(checkpoint, calls),
                         progress=False)  # another cut
    assert len(calls) == 3
    assert len(list(tmp_path.glob("item-vectors-*.safetensors"))) == 3


def test_a_cache_from_another_model_is_refused(checkpoint, tmp_path):
    groups = TitleGroups.from_titles(TITLES)
    settings = ItemHeadSettings(layers=1)
    ih.catalogue_vectors(checkpoint, groups, settings, tmp_path, _loader(checkpoint, []), progress=False)
    path = next(tmp_path.glob("item-vectors-*.safetensors"))
    other_key = ih.vectors_key({"another": "model"}, list(groups.titles), 2, settings)
    with pytest.raises(ih.ItemHeadError, match="another model, catalogue or method"):
        ih.load_vectors(path, other_key, len(groups))
    # a file with the right name but written for another model (e.g. copied): refused, not used
    key = path.name[len("item-vectors-"):-len(".safetensors")]
    ih.save_vectors(path, np.zeros((len(groups), 32), dtype=np.float32), "foreign")
    with pytest.raises(ih.ItemHeadError, match="delete it and run again"):
        ih.catalogue_vectors(checkpoint, groups, settings, tmp_path, _loader(checkpoint, []), progress=False)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ih.ItemHeadError, match="not a readable item-vector cache"):
        ih.load_vectors(path, key, len(groups))


def test_a_title_without_tokens_is_refused(checkpoint):
    from transformers import LlamaForCausalLM

    from fellrec_flwr.model import tiny

    model, tok = LlamaForCausalLM.from_pretrained(str(checkpoint)), tiny.load_tokenizer(checkpoint)
    with pytest.raises(ih.ItemHeadError, match="every catalogue item needs a title"):
        ih.encode_titles_at(model, tok, ["Alpha", ""], 1, 8, progress=False)


def test_top_layers_are_read_from_the_checkpoint(checkpoint):
    from transformers import LlamaForCausalLM

    config, layers, norm = ih.load_top_layers(checkpoint, 2)
    full = LlamaForCausalLM.from_pretrained(str(checkpoint))
    for i, state in enumerate(layers):
        expected = full.model.layers[config.num_hidden_layers - 2 + i].state_dict()
        assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    assert torch.equal(norm["weight"], full.model.norm.weight)


# --------------------------------------------------------------------------- through the ServerApp and ClientApp


@pytest.fixture()
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path_factory.getbasetemp() / "fellrec-cache"))


@pytest.mark.parametrize("strategy", ["fellrec", "fellrec+", "fedavg", "fedprox", "ffa-lora", "fedsa-lora", "local"])
def test_every_strategy_runs_with_the_item_head_in_process(tmp_path, private_cache, strategy):
    import json

    import pandas as pd
    from flwr.app import Context, RecordDict

    import server_app.app as server
    from client_app.app import app as client_app
    from fellrec_flwr.inprocess_grid import InProcessGrid
    from fellrec_flwr.train.checkpoint import load_checkpoint

    run_config = {
        "data.num-clients": 2, "min-clients": 2, "data.train-samples": 48, "data.valid-users": 16,
        "data.test-users": 16, "data.bpr-epochs": 2, "model.tiny-layers": 2, "model.tiny-vocab": 800,
        "model.tiny-pretrain-prompts": 64, "model.head": "item", "item-head.layers": 1, "train.batch-size": 16,
        "train.local-epochs": 1, "num-server-rounds": 2, "strategy": strategy, "out-dir": str(tmp_path),
        "run-name": "r",
    }
    grid = InProcessGrid(client_app, 2, run_config)
    server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    run_dir = tmp_path / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["per_client"]) == {"0", "1"} and 0 <= summary["overall"]["recall@10"] <= 1
    per_user = pd.read_csv(run_dir / "per_user.csv")
    assert {strategy, "popularity", "markov"} <= set(per_user["method"])
    state = load_checkpoint(run_dir).strategy_state
    initial = state["initial"]
    adapters = list(state["personal"].values()) if "personal" in state else [state["global"]]
    for arrays in adapters:  # every adapter carries the id table, moved away from the start
        key = next(k for k in arrays if k.endswith("id_emb.weight"))
        assert not np.array_equal(np.asarray(arrays[key]), np.asarray(initial[key]))
    assert (run_dir / "adapters" / "client-0" / "adapter_config.json").exists()
