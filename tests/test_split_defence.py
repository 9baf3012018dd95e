"""The wire defences (issue 25): noise statistics as configured, strength 0 == no defence bit for bit,
the server sees the noisy tensors, bad settings fail clearly, and why orthogonal mixing is not one."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fellrec_flwr.config import ConfigError, from_run_config
from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer
from fellrec_flwr.split.auth import issue_token
from fellrec_flwr.split.client import SplitServiceClient, make_split_model
from fellrec_flwr.split.defence import DefenceError, WireDefence, clip_and_noise, clip_bound
from fellrec_flwr.split.plan import plan_for_model
from fellrec_flwr.split.wire import decode
from server_app.split_service import start_service

SECRET = b"test-secret-0123456789abcdef"
TITLES = ["Super Mario Odyssey", "The Legend of Zelda: Breath of the Wild", "Halo 3", "Call of Duty: Black Ops",
          "Minecraft", "Grand Theft Auto V", "Mario Kart 8 Deluxe", "Final Fantasy VII Remake"]
TEXTS = ["Super Mario Odyssey and Halo 3", "Zelda", "Minecraft Grand Theft Auto V Mario Kart"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TITLES * 3, 400, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def full(tok):
    return build_tiny_model(tok, hidden=64, layers=4, heads=4, seed=0).eval()


# -- the noise itself (pure) -----------------------------------------------------------------


def test_noise_statistics_after_clipping():
    gen = torch.Generator().manual_seed(0)
    h = 256
    x = torch.randn(8, 200, h, generator=gen) * torch.linspace(0.1, 10, 200)[None, :, None]  # norms spread 100x
    sigma, clip = 0.5, 1.0
    bound = float(clip_bound(x, None, clip))
    assert bound == pytest.approx(float(x.norm(dim=-1).median()) * clip)
    out = clip_and_noise(x, sigma, clip, torch.Generator().manual_seed(1))
    norms = x.norm(dim=-1, keepdim=True)
    clipped = x * torch.clamp(bound / norms, max=1.0)
    assert float(clipped.norm(dim=-1).max()) == pytest.approx(bound, rel=1e-5)  # clipping happened
    noise = out - clipped
    expected_std = sigma * bound / math.sqrt(h)
    n = noise.numel()
    assert abs(float(noise.mean())) < 4 * expected_std / math.sqrt(n)
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.01)
    # sigma is the expected noise norm per position relative to the bound
    assert float(noise.norm(dim=-1).mean()) == pytest.approx(sigma * bound, rel=0.02)


def test_clip_bound_ignores_padding_and_same_seed_same_noise():
    x = torch.ones(1, 4, 8)
    x[0, 3] *= 1000  # a padding position with a huge norm
    mask = torch.tensor([[True, True, True, False]])
    assert float(clip_bound(x, mask, 2.0)) == pytest.approx(2 * math.sqrt(8))
    a = clip_and_noise(x, 1.0, 1.0, torch.Generator().manual_seed(3), mask)
    b = clip_and_noise(x, 1.0, 1.0, torch.Generator().manual_seed(3), mask)
    assert torch.equal(a, b)


def test_strength_zero_returns_the_tensor_itself():
    x = torch.randn(2, 3, 16) * 50
    assert clip_and_noise(x, 0.0, 1.0) is x
    assert WireDefence("noise", 0.0, 1.0).protect(x) is x
    assert WireDefence().protect(x) is x


# -- through the split service ---------------------------------------------------------------


def _client(handle, key="client-0", **kw):
    return SplitServiceClient(handle.url, key, issue_token(SECRET, key), **kw)


def _batch(tok):
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _run(model, batch):
    """Logits (no grad), then the loss and every trainable parameter's gradient."""
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss = model(**batch).loss
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_with_defence_at_strength_zero_equals_split_without(full, tok):
    plan = plan_for_model(full, 1, 1)
    handle = start_service(full, SECRET, 1, 1)
    try:
        batch = _batch(tok)
        plain = make_split_model(copy.deepcopy(full), plan, _client(handle))
        zero = make_split_model(copy.deepcopy(full), plan, _client(handle),
                                defence=WireDefence("noise", 0.0, 1.0, seed=5))
        la, lossa, ga = _run(plain, batch)
        lb, lossb, gb = _run(zero, batch)
        assert torch.equal(la, lb) and torch.equal(lossa, lossb)
        assert set(ga) == set(gb) and len(ga) > 0
        assert all(torch.equal(ga[n], gb[n]) for n in ga)
    finally:
        handle.stop()


def test_the_server_sees_clipped_noisy_activations_and_gradients(full, tok):
    plan = plan_for_model(full, 1, 1)
    handle = start_service(full, SECRET, 1, 1)
    seen: dict[str, list[dict[str, torch.Tensor]]] = {}
    try:
        batch = _batch(tok)
        observe = lambda method, body: seen.setdefault(method, []).append(decode(body)[0])  # noqa: E731
        clean = make_split_model(copy.deepcopy(full), plan, _client(handle, body_observer=observe))
        _run(clean, batch)
        clean_seen, seen = seen, {}
        noisy = make_split_model(copy.deepcopy(full), plan, _client(handle, body_observer=observe),
                                 defence=WireDefence("noise", 1.0, 1.0, seed=5))
        _, loss, grads = _run(noisy, batch)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
        mask = batch["attention_mask"].bool()
        for method, name in (("Forward", "hidden"), ("Backward", "grad")):
            sent, ref = seen[method][-1][name], clean_seen[method][-1][name]
            bound = float(clip_bound(ref, mask, 1.0))
            diff = sent - torch.clamp(bound / ref.norm(dim=-1, keepdim=True), max=1.0) * ref
            # what the server got is the clipped tensor plus noise of the configured size
            assert float(diff.norm(dim=-1).mean()) == pytest.approx(bound, rel=0.25), method
    finally:
        handle.stop()


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, fragment", [
    ({"split.defence": "mixing"}, "split.defence='mixing' is not one of none, noise"),
    ({"split.defence": "noise", "split.noise-sigma": -1.0}, "split.noise-sigma=-1.0 must be a finite number >= 0"),
    ({"split.defence": "noise", "split.noise-sigma": 1.0, "split.noise-clip": 0.0}, "split.noise-clip=0.0 must be > 0"),
    ({"split.noise-sigma": 0.5}, "has no effect with split.defence='none'"),
])
def test_bad_defence_settings_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        from_run_config(overrides)


def test_defence_from_settings_and_bad_direct_use():
    cfg = from_run_config({"split.defence": "noise", "split.noise-sigma": 0.5, "split.noise-clip": 2.0})
    d = WireDefence.from_settings(cfg.split, seed=1)
    assert (d.kind, d.noise_sigma, d.noise_clip, d.active) == ("noise", 0.5, 2.0, True)
    with pytest.raises(DefenceError, match="is not one of none, noise"):
        WireDefence("mixing")
    with pytest.raises(DefenceError, match="noise-clip"):
        clip_and_noise(torch.ones(1, 2), 1.0, -1.0)


# -- why not orthogonal mixing ------------------------------------------------------------------


def test_orthogonal_mixing_does_not_commute_with_a_server_layer(full):
    """A client-side rotation Q of the hidden dimension is invertible by the client (Q^T Q = I), but
    the server's public layer computed on Q x does not give Q layer(x): the server could not run on it."""
    layer = full.model.layers[1]
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    x = torch.randn(1, 6, 64, generator=gen)
    pos = torch.arange(6)[None]
    emb = full.model.rotary_emb(x, pos)
    run = lambda h: layer(h, attention_mask=None, position_ids=pos, position_embeddings=emb)  # noqa: E731
    with torch.no_grad():
        out = run(x)
        out = out[0] if isinstance(out, tuple) else out
        mixed = run(x @ q.T)
        mixed = mixed[0] if isinstance(mixed, tuple) else mixed
    assert torch.allclose((x @ q.T) @ q, x, atol=1e-5)  # the client can undo it
    # the layer's own contribution (its output minus the residual input) is not rotated along
    update, mixed_update = out - x, mixed - x @ q.T
    rel = float((mixed_update - update @ q.T).norm() / update.norm())
    assert rel > 0.5, rel


def test_nopeek_on_a_split_client_sees_what_is_sent_and_trains_its_front_layer(full, tok):
    """split.defence=nopeek hooks the split client itself (its layer front_k is the RemoteBody): the term
    equals the unsplit model's, and its gradient reaches the client's front layer and nothing after the cut."""
    from fellrec_flwr.split.nopeek import NoPeek

    plan = plan_for_model(full, 1, 1)
    handle = start_service(full, SECRET, 1, 1)
    try:
        batch = tok(TEXTS, return_tensors="pt", padding=True)
        terms, grads = [], []
        for model in (copy.deepcopy(full), make_split_model(copy.deepcopy(full), plan, _client(handle))):
            nopeek = NoPeek(2.0, seed=0).attach(model, front_k=1)
            model.train()
            model.zero_grad()
            model(**batch, use_cache=False)
            term = nopeek.take()
            term.backward()
            terms.append(float(term.detach()))
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert terms[0] == pytest.approx(terms[1], rel=1e-5) and terms[0] > 0
        split_grads = grads[1]
        assert any(".layers.0." in n and float(g.abs().sum()) > 0 for n, g in split_grads.items())
        assert not any(".layers.3." in n and float(g.abs().sum()) > 0 for n, g in split_grads.items())
    finally:
        handle.stop()
