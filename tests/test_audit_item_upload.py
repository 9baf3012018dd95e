"""The item head's upload audit (fellrec_flwr/audit/item_upload.py): the server reads a client's items
from the rows of its id-table update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fellrec_flwr.audit.item_upload import attack_rows, id_table
from fellrec_flwr.config import ItemHeadSettings, LoraSettings, TrainSettings
from fellrec_flwr.model import item_head as ih
from fellrec_flwr.model.lora_state import get_lora_state


def test_attack_rows_scores_a_hand_made_update():
    sent = np.zeros((6, 2))
    uploaded = sent.copy()
    uploaded[1] = [3.0, 4.0]  # norm 5
    uploaded[4] = [0.0, 2.0]  # norm 2
    uploaded[2] = [0.0, 1.0]  # norm 1, not an item
    got = attack_rows(sent, uploaded, [1, 4], score="norm")
    assert got["precision_at_n"] == 1.0 and got["items"] == 2
    assert got["auc"] == 1.0 and got["rows_moved"] == pytest.approx(3 / 6)
    got = attack_rows(sent, uploaded, [1, 5], score="norm")  # item 5 did not move: the top 2 hold only one of the items
    assert got["precision_at_n"] == 0.5
    # AUC by hand: item rows {5, 1} vs others {2, 4, 0, 3}: 1 beats all 4; 5 (0) ties 0 and 3 (half each)
    assert got["auc"] == pytest.approx((4 + 1) / 8)
    # every row moves by the same amount, the items in another direction: only the median score sees it
    uploaded = sent + np.array([1.0, 1.0])
    uploaded[[0, 3]] = sent[[0, 3]] + np.array([1.0, -1.0])
    assert attack_rows(sent, uploaded, [0, 3], score="norm")["auc"] == 0.5
    got = attack_rows(sent, uploaded, [0, 3])
    assert got["precision_at_n"] == 1.0 and got["auc"] == 1.0 and got["rows_moved"] == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        attack_rows(sent, uploaded, [])


def test_id_table_drops_the_padding_row_and_needs_one_table():
    assert id_table({"x.id_emb.weight": np.ones((5, 3)), "lora": np.zeros(2)}).shape == (4, 3)
    with pytest.raises(ValueError, match="id_emb"):
        id_table({"lora": np.zeros(2)})


def test_a_one_user_clients_history_is_read_from_its_upload():
    """Train a small item head on one user's sequence: the rows that moved most are that user's items,
    although the full softmax moves every row."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from fellrec_flwr.model.tiny import tiny_config

    config = tiny_config(50, hidden=32, layers=3, heads=4)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layers = [LlamaDecoderLayer(config, i).state_dict() for i in range(2)]
    for state in layers:
        for tensor in state.values():
            tensor.normal_(0, 0.2)
    groups = 40
    model = ih.build_item_model(config, layers, {"weight": torch.ones(32)}, torch.randn(groups, 32),
                                ItemHeadSettings(layers=2, id_dim=8), LoraSettings(r=4, alpha=8, dropout=0.0), 0)
    sent = id_table(get_lora_state(model))
    history = [3, 17, 8, 25, 31, 12]
    ih.train_item_head(model, [history], TrainSettings(local_epochs=2, batch_size=4, lr=3e-3),
                       ItemHeadSettings(layers=2, id_dim=8), seed=1, progress=False)
    got = attack_rows(sent, id_table(get_lora_state(model)), history)
    assert got["rows_moved"] == 1.0  # every row moved: "which rows changed" alone says nothing
    assert got["precision_at_n"] >= 5 / 6 and got["auc"] > 0.95  # but their sizes name the history


def test_norm_small_reads_a_client_that_touched_most_of_the_catalogue():
    sent = np.zeros((5, 2))
    uploaded = sent + np.array([2.0, 0.0])  # never-seen items: pushed the same way every step
    uploaded[[0, 1, 2]] = np.array([[0.1, 0.0], [0.0, 0.2], [0.1, 0.1]])  # the client's items: steps cancel
    assert attack_rows(sent, uploaded, [0, 1, 2], score="norm-small")["precision_at_n"] == 1.0
    assert attack_rows(sent, uploaded, [0, 1, 2], score="norm")["auc"] == 0.0  # the naive score, exactly wrong
    with pytest.raises(ValueError, match="norm-small"):
        attack_rows(sent, uploaded, [0], score="max")
