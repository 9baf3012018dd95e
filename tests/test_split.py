"""The split model: plan validation, partial loading, and split == unsplit (logits, LoRA grads,
generation, grounding embeddings), plus a wire audit that no token ids leave the client."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fellrec_flwr.split.plan import (
    PassThrough, SplitError, build_server_body, count_params, held_bytes_on_disk, load_client_model,
    load_server_body, plan_for_model, plan_split, save_full_model, split_model,
)
from fellrec_flwr.split.auth import issue_token
from fellrec_flwr.split.client import SplitServiceClient, embed_last_token, make_split_model, remote_body
from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer
from fellrec_flwr.split.wire import decode, read_header
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


def _client(handle, key="client-0", **kw):
    return SplitServiceClient(handle.url, key, issue_token(SECRET, key), **kw)


def _lora(model, plan, seed=0):
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     layers_to_transform=plan.client_layers, task_type="CAUSAL_LM")
    peft = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft.named_parameters():
        if "lora_" in name:  # B starts at zero in peft; randomise so A's gradient is not trivially 0
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return peft


def _batch(tok):
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any(), "the test batch must contain padding"
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


# -- the plan (pure) -------------------------------------------------------------------


def test_plan_layers():
    plan = plan_split(30, 2, 3)
    assert list(plan.front_layers) == [0, 1] and list(plan.back_layers) == [27, 28, 29]
    assert list(plan.server_layers) == list(range(2, 27)) and plan.client_layers == [0, 1, 27, 28, 29]
    assert plan.holds("model.layers.1.mlp.up_proj.weight", "client")
    assert not plan.holds("model.layers.1.mlp.up_proj.weight", "server")
    assert plan.holds("model.layers.10.self_attn.q_proj.weight", "server")
    assert plan.holds("model.embed_tokens.weight", "client") and plan.holds("lm_head.weight", "client")
    assert plan.holds("model.norm.weight", "client") and not plan.holds("model.norm.weight", "server")


@pytest.mark.parametrize("front,back,fragment", [
    (0, 1, "front_k=0"), (1, 0, "back_k=0"), (2, 2, "leaves no layer for the server"),
    (3, 2, "leaves no layer"), (5, 1, "leaves no layer"), (-1, 1, "front_k=-1"), (1.5, 1, "front_k=1.5"),
])
def test_invalid_cuts(front, back, fragment):
    with pytest.raises(SplitError, match="4 layers") as err:
        plan_split(4, front, back)
    assert fragment in str(err.value)


def test_too_small_model_and_invalid_cut_on_model(full):
    with pytest.raises(SplitError, match="at least 3"):
        plan_split(2, 1, 1)
    with pytest.raises(SplitError, match="valid range 1..2"):
        split_model(full, 0, 1)


# -- the service's own attention mask (independent of transformers' mask helpers) -------


def test_attention_bias_matches_direct_rule():
    from fellrec_flwr.split.plan import attention_bias

    keys = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = attention_bias(keys, 2, 2, 3, torch.float32, "cpu")  # 3 cached tokens + 2 new
    for b in range(2):
        for i in range(2):
            for j in range(5):
                assert bool(got[b, 0, i, j]) == (j <= 3 + i and bool(keys[b, j])), (b, i, j)
    add = attention_bias(keys, 2, 2, 3, torch.float32, "cpu", additive=True)
    assert torch.equal(add == 0, got) and (add[~got] == torch.finfo(torch.float32).min).all()
    with pytest.raises(SplitError, match=r"must be \[2, 5\]"):
        attention_bias(keys[:, :4], 2, 2, 3, torch.float32, "cpu")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_server_body_matches_unsplit_middle_layers(full, tok, impl):
    """The body's own mask gives the unsplit model's middle-layer output, for either attention backend."""
    model = copy.deepcopy(full)
    model.config._attn_implementation = impl
    body = build_server_body(model, plan_for_model(model, 1, 1))
    seen = {}
    model.model.layers[1].register_forward_pre_hook(
        lambda m, a, kw: seen.update(inp=(a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
    model.model.layers[2].register_forward_hook(
        lambda m, a, out: seen.update(out=(out[0] if isinstance(out, tuple) else out).detach()))
    batch = _batch(tok)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pos = torch.arange(batch["input_ids"].shape[1])[None]
        mine = body(seen["inp"], batch["attention_mask"].bool(), pos)
    real = batch["attention_mask"].bool()
    assert torch.allclose(mine[real], seen["out"][real], atol=1e-5)


def test_cache_keyword_follows_the_layer_signature():
    from fellrec_flwr.split.plan import cache_kwarg

    class Old(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, past_key_values=None):
            return hidden_states

    class New(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, cache=None):
            return hidden_states

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"


def test_new_token_mask_takes_the_last_q_columns():
    from fellrec_flwr.split.client import new_token_mask

    full_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(new_token_mask(full_mask, 1), torch.tensor([[True], [True]]))
    assert torch.equal(new_token_mask(full_mask, 4), full_mask.bool())
    assert new_token_mask(None, 3) is None
    with pytest.raises(SplitError, match="covers 4 tokens but 5"):
        new_token_mask(full_mask, 5)


# -- partial loading from safetensors --------------------------------------------------


def test_client_loads_only_its_tensors(full, tok, tmp_path):
    folder = save_full_model(full, tmp_path / "full", tok)
    plan = plan_for_model(full, 1, 1)
    client = load_client_model(folder, 1, 1)
    assert isinstance(client.model.layers[1], PassThrough) and isinstance(client.model.layers[2], PassThrough)
    n_full, n_client = count_params(full), count_params(client)
    per_layer = count_params(full.model.layers[1])
    assert n_client == n_full - 2 * per_layer
    assert not any(k.startswith(("model.layers.1.", "model.layers.2.")) for k in client.state_dict())
    assert held_bytes_on_disk(folder, plan, "client") == 4 * n_client
    assert held_bytes_on_disk(folder, plan, "server") == 4 * 2 * per_layer
    body = load_server_body(folder, 1, 1)
    assert count_params(body) == 2 * per_layer
    ref = build_server_body(full, plan)
    for a, b in zip(body.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    hidden, pos = torch.randn(2, 5, 64), torch.arange(5)[None]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():  # same output, padding and causality included
        assert torch.equal(body(hidden, mask, pos), ref(hidden, mask, pos))
        assert not torch.allclose(body(hidden, None, pos)[0], body(hidden, mask, pos)[0])
    # the client's own tensors are exactly the full model's
    full_sd = full.state_dict()
    for k, v in client.state_dict().items():
        assert torch.equal(v, full_sd[k]), k
    with pytest.raises(SplitError, match="make_split_model"):  # never silently skips the middle
        client(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(SplitError, match="no .safetensors"):
        load_client_model(tmp_path, 1, 1)


def test_client_memory_is_proportional(tmp_path):
    """In a subprocess, measured: loading the client part of a model whose middle layers are big
    grows the resident memory far less than loading the whole model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    save_full_model(LlamaForCausalLM(cfg), tmp_path / "m")  # ~2.4 MB per layer, 29 MB in all
    script = f"""
import gc, os
from transformers import LlamaForCausalLM
from fellrec_flwr.split.plan import load_client_model
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
touch = lambda m: sum(float(p.sum()) for p in m.parameters())  # make every page resident
touch(load_client_model(r"{tmp_path}/m", 1, 1)); gc.collect()  # warm lazy imports/allocators first
base = rss(); client = load_client_model(r"{tmp_path}/m", 1, 1); touch(client); c = rss() - base
base = rss(); full = LlamaForCausalLM.from_pretrained(r"{tmp_path}/m"); touch(full); f = rss() - base
print(c, f)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    client_bytes, full_bytes = map(int, out.split()[-2:])
    assert full_bytes > 20e6, full_bytes
    assert client_bytes < 0.5 * full_bytes, (client_bytes, full_bytes)  # RSS is noisy; params are ~25 %


# -- split == unsplit -------------------------------------------------------------------


@pytest.mark.parametrize("cut", [(1, 1), (1, 2), (2, 1)])
def test_logits_and_lora_grads_match(full, tok, cut):
    plan = plan_for_model(full, *cut)
    handle = start_service(full, SECRET, *cut)
    try:
        batch = _batch(tok)
        ref = _lora(copy.deepcopy(full), plan)
        split = make_split_model(_lora(copy.deepcopy(full), plan), plan, _client(handle))
        assert len(list(split.base_model.model.model.layers[plan.front_k].parameters())) == 0
        with torch.no_grad():
            a = ref(**batch, use_cache=False).logits
            b = split(**batch, use_cache=False).logits
        real = batch["attention_mask"].bool()
        assert torch.allclose(a[real], b[real], atol=1e-4)
        ref.train(), split.train()
        loss_a = ref(**batch).loss
        loss_b = split(**batch).loss
        loss_a.backward(), loss_b.backward()
        assert abs(loss_a.item() - loss_b.item()) < 1e-4
        grads_a = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        grads_b = {n: p.grad for n, p in split.named_parameters() if p.requires_grad}
        assert set(grads_a) == set(grads_b) and len(grads_a) == 4 * len(plan.client_layers)
        for name, g in grads_a.items():
            assert g.abs().sum() > 0, name
            assert torch.allclose(g, grads_b[name], atol=1e-3, rtol=1e-3), name
        assert handle.service.stats["cached_backward"] == 1
    finally:
        handle.stop()


def test_backward_recompute_without_activation_cache(full, tok):
    from server_app.split_service import ServiceLimits

    plan = plan_for_model(full, 1, 1)
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(activation_cache_bytes=0))
    try:
        batch = _batch(tok)
        ref, split = _lora(copy.deepcopy(full), plan), make_split_model(_lora(copy.deepcopy(full), plan), plan,
                                                                         _client(handle))
        ref(**batch).loss.backward()
        split(**batch).loss.backward()
        for (n, p), (_, q) in zip(ref.named_parameters(), split.named_parameters()):
            if p.requires_grad:
                assert torch.allclose(p.grad, q.grad, atol=1e-3, rtol=1e-3), n
        assert handle.service.stats["recomputed_backward"] == 1 and handle.service.stats["cached_backward"] == 0
    finally:
        handle.stop()


def test_lora_on_server_layers_is_refused(full):
    plan = plan_for_model(full, 1, 1)
    handle = start_service(full, SECRET, 1, 1)
    try:
        peft = get_peft_model(copy.deepcopy(full), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        with pytest.raises(SplitError, match=r"layers_to_transform=\[0, 3\]"):
            make_split_model(peft, plan, _client(handle))
    finally:
        handle.stop()


def test_wrong_model_or_cut_is_detected(full, tok):
    handle = start_service(full, SECRET, 1, 1)
    try:
        other = build_tiny_model(tok, hidden=64, layers=4, heads=4, seed=1)
        with pytest.raises(SplitError, match="different weights"):
            make_split_model(other, plan_for_model(other, 1, 1), _client(handle))
        with pytest.raises(SplitError, match="serves"):
            make_split_model(copy.deepcopy(full), plan_for_model(full, 2, 1), _client(handle))
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def service(full):
    handle = start_service(full, SECRET, 1, 1)
    yield handle
    handle.stop()


@pytest.mark.parametrize("beams", [1, 2])
def test_generation_matches(full, tok, service, beams):
    plan = plan_for_model(full, 1, 1)
    seen = []
    client = _client(service, body_observer=lambda path, body: seen.append((path, body)))
    split = make_split_model(copy.deepcopy(full), plan, client)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=8, num_beams=beams, do_sample=False)
    torch.manual_seed(0)
    want = full.generate(**batch, **kwargs)
    torch.manual_seed(0)
    got = split.generate(**batch, **kwargs)
    assert torch.equal(want, got)
    steps = [decode(b)[0] for p, b in seen if p == "InferStep"]
    prompt_len = batch["input_ids"].shape[1]
    assert len(steps) == got.shape[1] - prompt_len and steps[0]["hidden"].shape[1] == prompt_len
    assert all(s["hidden"].shape[1] == 1 for s in steps[1:])  # the server's KV cache is used
    assert any("beam_idx" in s for s in steps) == (beams > 1)


def test_session_lost_mid_generation_is_replayed(full, tok, service):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class DropSessions(StoppingCriteria):  # empties the server's sessions after step 3
        calls = 0

        def __call__(self, input_ids, scores, **kw):
            DropSessions.calls += 1
            if DropSessions.calls == 3:
                with service.service._lock:
                    service.service._sessions.clear()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    split = make_split_model(copy.deepcopy(full), plan_for_model(full, 1, 1), _client(service))
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    want = full.generate(**batch, max_new_tokens=6, num_beams=2, do_sample=False)
    got = split.generate(**batch, max_new_tokens=6, num_beams=2, do_sample=False,
                         stopping_criteria=StoppingCriteriaList([DropSessions()]))
    assert DropSessions.calls >= 3
    assert torch.equal(want, got)


def test_fp16_wire_is_close(full, tok, service):
    split = make_split_model(copy.deepcopy(full), plan_for_model(full, 1, 1), _client(service), wire="float16")
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = full(**batch, use_cache=False).logits, split(**batch, use_cache=False).logits
    real = batch["attention_mask"].bool()
    assert not torch.equal(a[real], b[real]) and torch.allclose(a[real], b[real], atol=2e-2)


def test_grounding_embeddings_through_split(full, tok, service):
    split = make_split_model(copy.deepcopy(full), plan_for_model(full, 1, 1), _client(service))
    got = embed_last_token(split, tok, TEXTS, batch_size=2)
    # direct computation: unsplit base model, one text at a time, final-norm state at the last token
    for text, row in zip(TEXTS, got):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            out = full(**ids, output_hidden_states=True)
        post_norm = full.model(**ids).last_hidden_state[0, -1]
        assert torch.allclose(out.hidden_states[-1][0, -1], post_norm)  # transformers 5: [-1] is post-norm
        assert torch.allclose(torch.from_numpy(row), post_norm, atol=1e-4)


def test_client_model_from_file_through_service(full, tok, tmp_path, service):
    folder = save_full_model(full, tmp_path / "full", tok)
    client = load_client_model(folder, 1, 1)
    split = make_split_model(client, plan_for_model(client, 1, 1), _client(service))
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = full(**batch).logits, split(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(a[real], b[real], atol=1e-4)
    assert remote_body(split).client.url == service.url


# -- wire audit -------------------------------------------------------------------------


def test_no_token_ids_or_labels_on_the_wire(full, tok, service):
    plan = plan_for_model(full, 1, 1)
    seen: list[tuple[str, bytes]] = []
    client = _client(service, body_observer=lambda path, body: seen.append((path, body)))
    split = make_split_model(_lora(copy.deepcopy(full), plan), plan, client)
    batch = _batch(tok)
    split.train()
    split(**batch).loss.backward()  # a training step
    split.eval()
    generated = split.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               max_new_tokens=4, num_beams=2, do_sample=False)  # an inference
    assert {p for p, _ in seen} >= {"Forward", "Backward", "InferStep"}
    allowed = {"hidden", "attention_mask", "position_ids", "grad", "beam_idx"}
    secrets_ = [row for row in generated] + [row for row in batch["labels"]]
    for path, body in seen:
        if path == "InferClose":
            continue
        header, meta = read_header(body)
        assert set(header) <= allowed, (path, set(header))
        assert header["hidden"]["dtype"] == "F32"
        assert set(meta) <= {"keep_graph", "activation_id", "session", "past_len", "close"}
        for row in secrets_:
            real = row[row >= 0]
            for dtype in (torch.int64, torch.int32):
                assert real.to(dtype).numpy().tobytes() not in body, f"token ids found in a {path} body"


def test_constrained_search_through_the_service_matches_unsplit(full, tok, service):
    """Catalogue-constrained decoding reorders the KV cache with a varying number of beams per step;
    the service follows (beam_idx may change the row count) and the lists equal the unsplit model's."""
    from fellrec_flwr.eval.constrained import build_title_trie, constrained_search

    trie = build_title_trie(tok, TITLES)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    masked = [[0], [], [2, 3]]
    want = constrained_search(full, prompts, trie, 3, beams=2, masked_groups=masked, pad_token_id=tok.pad_token_id)
    split = make_split_model(copy.deepcopy(full), plan_for_model(full, 1, 1), _client(service))
    got = constrained_search(split, prompts, trie, 3, beams=2, masked_groups=masked, pad_token_id=tok.pad_token_id)
    assert (want[0] >= 0).all() and np.array_equal(want[0], got[0])
    assert np.allclose(want[1], got[1], atol=1e-4)
