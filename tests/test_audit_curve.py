"""The defences' privacy-quality curve (fellrec_flwr.audit.curve, `python -m fellrec_flwr.audit --curve`)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from fellrec_flwr.audit import AuditError, AuditSettings
from fellrec_flwr.audit.__main__ import cpu_threads, main as audit_main
from fellrec_flwr.audit.curve import CURVE_COLUMNS, CurveSettings, defended_at, run_curve
from fellrec_flwr.audit.data import load_audit_data
from fellrec_flwr.audit.identify import TitleMatcher
from fellrec_flwr.audit.observe import decoder_layers
from fellrec_flwr.config import ModelConfig
from fellrec_flwr.model.loading import load_base_model
from fellrec_flwr.seeding import derive_seed
from fellrec_flwr.split.defence import WireDefence, clip_and_noise

SMALL = AuditSettings(train_prompts=30, history_len=5, max_length=160, batch_size=8, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    titles, examples = load_audit_data("demo", eval_users=10, history_len=5, seed=derive_seed(0, "eval-users"))
    model, tokenizer = load_base_model(ModelConfig(name="tiny", device="cpu", tiny_pretrain_prompts=0), titles,
                                       tmp_path_factory.mktemp("curve-work"))
    return titles, examples, model, tokenizer


def test_top5_counts_the_item_among_five_best_guesses_ties_against_the_attacker():
    titles = {1: "Super Mario Odyssey", 2: "Super Mario Galaxy", 3: "Halo 3", 4: "Mario Kart", 5: "Mario Party",
              6: "Mario Tennis", 7: "Mario Golf", 8: "Mario Strikers", 9: "Mario Paint"}
    m = TitleMatcher(titles)
    # "super mario" overlaps 1 and 2 best (F1 0.8): both within the top 5
    assert m.in_top(["Super Mario"], [1], 5).tolist() == [True]
    # "mario" ties at F1 0.67 with 6 two-word titles: 5 others score as high, so not a top-5 hit
    assert m.in_top(["Mario"], [4], 5).tolist() == [False]
    assert m.in_top(["Halo"], [3], 1).tolist() == [True]
    assert m.in_top(["Zelda"], [3], 5).tolist() == [False]  # no overlap is never a hit


def test_defended_at_applies_the_clients_defence_to_the_layer_input(demo):
    _, _, model, tok = demo
    ids = tok(["Halo 3 and Minecraft", "Zelda"], return_tensors="pt", padding=True)
    layer = decoder_layers(model)[1]
    capture = lambda store: (lambda m, a, k: store.append((a[0] if a else k["hidden_states"]).detach().clone()))  # noqa: E731
    clean_in, sent = [], []
    hook = layer.register_forward_pre_hook(capture(clean_in), with_kwargs=True)  # runs before the defence
    try:
        with torch.no_grad():
            clean = model(**ids).logits
            with defended_at(model, 1, WireDefence("noise", 0.0, 1.0)):
                zero = model(**ids).logits
            with defended_at(model, 1, WireDefence("noise", 1.0, 1.0, seed=3)):
                after = layer.register_forward_pre_hook(capture(sent), with_kwargs=True)  # runs after it
                noisy = model(**ids).logits
                after.remove()
    finally:
        hook.remove()
    assert torch.equal(clean, zero)  # strength 0 = no defence
    assert not torch.allclose(clean, noisy)
    # what layer 1 computed on = the client's clip + noise of its clean input, padding left out of the median
    mask = ids["attention_mask"].bool()
    expected = clip_and_noise(clean_in[-1], 1.0, 1.0, torch.Generator().manual_seed(3), mask)
    assert torch.allclose(sent[0], expected, atol=1e-6)


def test_curve_rows_columns_and_the_noise_line(demo, tmp_path):
    titles, examples, model, tok = demo
    curve = CurveSettings(noise_sigmas=(4.0,), deeper_front_ks=(2,), replicates=200)
    df, detail = run_curve(model, tok, titles, examples, "demo", SMALL, curve)
    assert list(df.columns) == CURVE_COLUMNS
    assert df[["defence", "strength"]].values.tolist() == [["none", 0.0], ["noise", 4.0], ["front-k", 1.0]]
    none = df.iloc[0]
    assert none["recall_ci_low"] == none["recall_ci_high"] == 0.0 and none["n_users"] == len(examples)
    assert none["recovery_top1"] > 0.5  # an untrained tiny model keeps its input: the server reads it
    assert df.iloc[1]["recovery_top1"] < none["recovery_top1"] - 0.3  # sigma 4 drowns the signal
    assert (df["recovery_top5"] >= df["recovery_top1"] - 1e-9).all()
    assert df.iloc[2]["recall@10"] == none["recall@10"]  # a deeper cut computes the same model
    assert set(detail["channel"]) == {"front activation", "back gradient"} and len(detail) == 6


def test_curve_settings_and_cli_errors(demo, capsys):
    with pytest.raises(AuditError, match="deeper front cuts"):
        CurveSettings(deeper_front_ks=(1,)).validate(4)
    with pytest.raises(AuditError, match="is not a split of this 4-layer model"):
        CurveSettings(deeper_front_ks=(3,)).validate(4)
    with pytest.raises(AuditError, match="noise-sigma=-1"):
        CurveSettings(noise_sigmas=(-1.0,)).validate(4)
    assert audit_main(["--data", "games", "--finetune-epochs", "1", "--curve", "--out", "/tmp/never"]) == 2
    assert "--finetune-epochs needs --curve and --data demo or prepared" in capsys.readouterr().err


def test_defended_at_noises_the_back_cut_gradient_in_training(demo):
    _, _, model, tok = demo
    model = copy.deepcopy(model)
    ids = tok(["Halo 3 and Minecraft", "Zelda"], return_tensors="pt", padding=True)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    grads_at = {}

    def grads(defence):
        model.zero_grad()
        with defended_at(model, 1, defence, grad_layer=3):
            def keep_grad(module, args, kwargs):
                (args[0] if args else kwargs["hidden_states"]).register_hook(
                    lambda g: grads_at.__setitem__("back", g.clone()))

            h = decoder_layers(model)[3].register_forward_pre_hook(keep_grad, with_kwargs=True)
            model(**ids, labels=labels).loss.backward()
            h.remove()
        return model.model.embed_tokens.weight.grad.clone(), grads_at["back"]

    clean, _ = grads(WireDefence())
    zero, _ = grads(WireDefence("noise", 0.0, 1.0))
    noisy, _ = grads(WireDefence("noise", 1.0, 1.0, seed=2))
    assert torch.equal(clean, zero)
    assert not torch.allclose(clean, noisy)  # the client's layers learned from the noisy returned gradient


def test_nopeek_line_trains_with_the_term_and_is_attacked_through_the_client_model(demo, tmp_path):
    titles, examples, model, tok = demo
    train = [SimpleNamespace(history=list(h), target=t) for _, h, t in examples]
    curve = CurveSettings(noise_sigmas=(), deeper_front_ks=(), nopeek_alphas=(50.0,), replicates=200)
    df, detail = run_curve(model, tok, titles, examples, "demo", SMALL, curve, train_examples=train, finetune_epochs=1)
    assert df[["defence", "strength"]].values.tolist() == [["none", 0.0], ["nopeek", 50.0]]
    # both attackers on both channels, for the fine-tuned clients
    assert len(detail) == 8 and set(detail["attacker"]) == {"base model", "client model"}
    nopeek = detail[detail["defence"] == "nopeek"]
    none = detail[detail["defence"] == "none"]
    # a client trained with the term sends something else than one trained without it
    assert not np.allclose(nopeek["token_acc"].values, none["token_acc"].values)
    assert df.iloc[1]["recovery_top1"] == pytest.approx(
        nopeek["history_item_recall"].max())  # the row is the best of channels and attackers

    # --append merges rows into an existing curve, keeping the shared baseline
    from fellrec_flwr.audit.report import merge_curve, write_curve

    first = df.iloc[:1]
    write_curve(tmp_path, first, detail[detail["defence"] == "none"].drop(columns="attacker"), {"seed": 0}, "one", "t")
    merged, merged_detail, record, command = merge_curve(tmp_path, df, detail, {"seed": 1}, "two")
    assert merged[["defence", "strength"]].values.tolist() == [["none", 0.0], ["nopeek", 50.0]]
    assert len(merged_detail) == 8 and record["runs"] == [{"seed": 0}, {"seed": 1}] and command == "one ; two"
    with pytest.raises(AuditError, match="strength-0 recall@10"):
        merge_curve(tmp_path, df.assign(**{"recall@10": df["recall@10"] + 0.5}), detail, {}, "three")
