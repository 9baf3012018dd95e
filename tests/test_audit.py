"""Privacy audit (fellrec_flwr.audit): encoding, observation, inverter, matching, pipeline."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from fellrec_flwr.audit import AuditError, AuditSettings, run_audit
from fellrec_flwr.audit.__main__ import cpu_threads, main as audit_main
from fellrec_flwr.audit.data import load_audit_data
from fellrec_flwr.audit.defence import add_relative_noise
from fellrec_flwr.audit.identify import TitleMatcher
from fellrec_flwr.audit.inverter import fit_inverter, window_features
from fellrec_flwr.audit.observe import observe
from fellrec_flwr.audit.sequences import encode_sequence, synthetic_histories, title_char_ranges
from fellrec_flwr.data.collate import encode_example
from fellrec_flwr.config import ModelConfig
from fellrec_flwr.model.loading import load_base_model
from fellrec_flwr.data.prompts import build_prompt
from fellrec_flwr.seeding import derive_seed

# Small but real: the tiny model on the demo catalogue, a few cuts (keeps the file well under a minute).
SMALL = AuditSettings(front_cuts=(0, 2), back_cuts=(1,), train_prompts=40, history_len=5, max_length=160,
                      batch_size=8, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: on a shared 2-core machine, 2 threads spin against each other (10x slower)."""
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # the users the CLI picks for --seed 0, so that CLI and library runs can be compared exactly
    titles, examples = load_audit_data("demo", eval_users=12, history_len=5, seed=derive_seed(0, "eval-users"))
    model, tokenizer = load_base_model(ModelConfig(name="tiny", device="cpu", tiny_pretrain_prompts=0), titles,
                                       tmp_path_factory.mktemp("audit-work"))
    return titles, examples, model, tokenizer


def test_title_char_ranges_point_at_the_titles():
    titles = ['Halo 3', 'Mario & "Luigi"', 'Zelda, Ocarina']
    prompt = build_prompt(titles)
    assert [prompt[a:b] for a, b in title_char_ranges(titles)] == titles


def test_encoded_sequence_is_what_collate_sends_and_spans_cover_titles(demo):
    titles, examples, _, tok = demo
    _, history, target = examples[0]
    seq = encode_sequence(tok, titles, history, target, max_length=256)
    sent = encode_example(tok, [titles[i] for i in history], titles[target], max_length=256)
    assert list(seq.input_ids) == sent.input_ids
    assert [s.item_id for s in seq.history] == list(history) and seq.target.item_id == target
    for span in [*seq.history, seq.target]:
        assert titles[span.item_id] in tok.decode(list(seq.input_ids[span.start:span.end]))
    # Truncation drops the oldest titles, as collate does, and the spans follow.
    short = encode_sequence(tok, titles, history, target, max_length=len(seq.input_ids) - 1)
    assert [s.item_id for s in short.history] == list(history[1:])


def test_observed_activations_and_gradients_match_a_direct_computation(demo):
    titles, examples, model, tok = demo
    model = copy.deepcopy(model).double()  # float64 so that finite differences are exact enough
    seqs = [encode_sequence(tok, titles, h, t, 256) for _, h, t in examples[:2]]
    layers = model.model.layers
    obs = observe(model, seqs, activation_layers=[0, 2], gradient_layers=[2, 3], pad_id=tok.pad_token_id)
    # Activation = the input of decoder layer j (captured by a hook), sequence 1 alone.
    captured = {}

    def capture(module, args, kwargs) -> None:
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    hook = layers[2].register_forward_pre_hook(capture, with_kwargs=True)
    ids = torch.tensor([seqs[1].input_ids])
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    start = obs.activations[2].offset[1]
    np.testing.assert_allclose(obs.activations[2].raw(1), captured["h"][0, start:].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(obs.activations[0].raw(1),
                               model.get_input_embeddings()(ids)[0, start:].detach().numpy(), rtol=2e-3, atol=2e-3)

    # Gradient = d(mean token loss)/d(input of layer j): a directional derivative by finite differences.
    # j = 2 is where the backward graph starts (a leaf), j = 3 lies inside it.
    def loss_with(j: int, delta: torch.Tensor) -> float:
        def shift(module, args, kwargs):
            if args:
                return (args[0] + delta, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}

        h = layers[j].register_forward_pre_hook(shift, with_kwargs=True)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        h.remove()
        logp = torch.log_softmax(logits[0, :-1], -1)
        return float(-logp.gather(-1, ids[0, 1:, None]).mean())

    for j in (2, 3):
        head = obs.gradients[j].offset[1]  # the template before the first title is not stored
        direction = torch.randn((1, ids.shape[1], model.config.hidden_size), generator=torch.Generator().manual_seed(j),
                                dtype=torch.float64)
        direction[:, :head] = 0
        direction /= direction.norm()
        eps = 1e-4
        numeric = (loss_with(j, eps * direction) - loss_with(j, -eps * direction)) / (2 * eps)
        analytic = float((torch.from_numpy(obs.gradients[j].raw(1)).double() * direction[0, head:]).sum())
        assert analytic == pytest.approx(numeric, rel=2e-2)


def test_window_features_shift_and_zero_pad():
    vecs = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    feats = window_features(vecs, np.array([0, 3]), width=1)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    np.testing.assert_allclose(feats[0], np.concatenate([np.zeros(3), unit[0], unit[1]]), rtol=1e-6)
    np.testing.assert_allclose(feats[1], np.concatenate([unit[2], unit[3], np.zeros(3)]), rtol=1e-6)


def test_inverter_recovers_tokens_through_a_hidden_linear_map():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    mix = rng.standard_normal((8, 8)).astype(np.float32)
    tokens = rng.integers(0, 50, size=600)
    feats = emb[tokens] @ mix + 0.01 * rng.standard_normal((600, 8)).astype(np.float32)
    inv = fit_inverter(feats[:500], tokens[:500], emb, np.arange(50), groups=np.arange(500) // 10)
    assert np.mean(inv.tokens(feats[500:], np.arange(50), emb) == tokens[500:]) > 0.95
    # Unrelated features recover (almost) nothing: the probe is not memorising the answer.
    noise = rng.standard_normal((600, 8)).astype(np.float32)
    inv = fit_inverter(noise[:500], tokens[:500], emb, np.arange(50), groups=np.arange(500) // 10)
    assert np.mean(inv.tokens(noise[500:], np.arange(50), emb) == tokens[500:]) < 0.2


def test_title_matcher_grounds_near_and_rejects_far_titles():
    m = TitleMatcher({0: "Super Mario Galaxy 2", 1: "Super Mario Galaxy", 2: "Halo 3", 3: "Halo 3"})
    texts = ["Super Mario Galaxy 2", "super mario galaxy two", "Halo 3", "Halo Reach", "Super Mario Galaxy"]
    assert m.identified(texts, [0, 0, 3, 2, 0]).tolist() == [True, False, True, False, False]
    assert m.identified(["Super Mario Galaxy 2 !"], [1]).tolist() == [False]  # best match is another title


def test_relative_noise_has_the_requested_scale():
    x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32) * 5
    noisy = add_relative_noise(x, 0.5, seed=1)
    ratio = np.std(noisy - x) / np.sqrt(np.mean(x ** 2))
    assert ratio == pytest.approx(0.5, rel=0.05)
    np.testing.assert_array_equal(noisy, add_relative_noise(x, 0.5, seed=1))


def test_bad_settings_name_the_problem(demo):
    titles, examples, model, tok = demo
    with pytest.raises(AuditError, match="front cuts"):
        run_audit(model, tok, titles, examples, AuditSettings(front_cuts=(4,)))
    with pytest.raises(AuditError, match="back cuts"):
        run_audit(model, tok, titles, examples, AuditSettings(back_cuts=(0,)))
    with pytest.raises(AuditError, match="direction"):
        run_audit(model, tok, titles, examples, AuditSettings(directions=("sideways",)))


def test_audit_recovers_at_k0_one_row_per_cut_and_is_repeatable(demo, tmp_path):
    titles, examples, model, tok = demo
    df = run_audit(model, tok, titles, examples, SMALL)
    assert list(zip(df.k, df.direction, df.observed)) == [
        (0, "front", "activation"), (2, "front", "activation"), (1, "back", "activation"), (1, "back", "gradient")]
    assert (df.n_eval == 12).all() and (df.n_history_items > 0).all()
    k0 = df.iloc[0]
    assert k0.token_acc > 0.8 and k0.history_item_recall > 0.8 and k0.target_item_recall > 0.8
    # The CLI with the same seed and settings writes exactly the same numbers.
    out = tmp_path / "run"
    assert audit_main(["--model", "tiny", "--data", "demo", "--cuts", "0,2", "--back-cuts", "1", "--out", str(out),
                       "--train-prompts", "40", "--eval-users", "12", "--history-len", "5", "--max-length", "160",
                       "--seed", "0", "--tiny-pretrain-prompts", "0", "--work-dir", str(tmp_path / "work")]) == 0
    again = pd.read_csv(out / "audit.csv")
    assert {p.name for p in out.iterdir()} >= {"audit.csv", "audit.png", "report.md", "settings.json"}
    pd.testing.assert_frame_equal(again, df, check_dtype=False, rtol=1e-5)
    repeat = run_audit(model, tok, titles, examples, SMALL)
    pd.testing.assert_frame_equal(repeat, df)


def test_ridge_matches_sklearn():
    from sklearn.linear_model import Ridge

    from fellrec_flwr.audit.inverter import ridge

    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((200, 6)), rng.standard_normal((200, 3))
    ours = ridge(x, y, alpha=0.1)
    centred = x - x.mean(0)
    lam = 0.1 * np.trace(centred.T @ centred) / 6
    ref = Ridge(alpha=lam).fit(x, y)
    np.testing.assert_allclose(ours.predict(x), ref.predict(x), rtol=1e-4, atol=1e-5)


def test_noise_hook_perturbs_only_when_sigma_is_positive(demo):
    from fellrec_flwr.audit.defence import NoiseAt, mean_loss

    titles, examples, model, tok = demo
    seqs = [encode_sequence(tok, titles, h, t, 256) for _, h, t in examples[:3]]
    clean = mean_loss(model, seqs, tok.pad_token_id)
    assert mean_loss(model, seqs, tok.pad_token_id, noise=NoiseAt(1, 0.0, seed=0)) == pytest.approx(clean, abs=1e-6)
    assert mean_loss(model, seqs, tok.pad_token_id, noise=NoiseAt(1, 5.0, seed=0)) != pytest.approx(clean, abs=1e-4)
