"""CPU speed options of training: each fast path against the plain one, autocast choice, bucketing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fellrec_flwr.data.collate import IGNORE_INDEX, TrainCollator, bucketed_batches, encode_examples
from fellrec_flwr.config import TrainSettings
from fellrec_flwr.model.lora_state import flatten_state, get_lora_state
from fellrec_flwr.model.speed import (
    AutocastChooser,
    FastForward,
    autocast_dtype,
    chunked_head_loss,
    cpu_has_native_bf16,
    decoder_parts,
    first_changing_layer,
    labelled_head_loss,
    pad_hidden,
    vocab_block,
)
from fellrec_flwr.train.trainer import eval_loss, token_loss_sum, train_local

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import TITLES, TRAIN, fresh, small_lora  # noqa: E402

PLAIN = dict(autocast="off", labelled_logits_only=False, prefix_cache_mb=0)
CPUINFO_AVX2 = "processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse avx2 fma\n"
CPUINFO_AMX = "processor\t: 0\nmodel name\t: New CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"


def randomised(model, seed=0):
    """LoRA B starts at zero (a no-op adapter); give it values so the paths really differ if wrong."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def batch_of(tok, examples, train_on_inputs=True):
    feats = encode_examples(tok, examples, TITLES, 256, train_on_inputs)
    return TrainCollator(tok.pad_token_id)(feats), feats


# ---------------------------------------------------------------- pure pieces


def test_labelled_head_loss_equals_full_logits_loss():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 5, generator=gen)
    head = torch.nn.Linear(5, 9, bias=False)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 8, IGNORE_INDEX], [1, 2, 3, IGNORE_INDEX, 0, 7]])
    fast, n_fast = labelled_head_loss(hidden, labels, head)
    full, n_full = token_loss_sum(head(hidden), labels)
    assert n_fast == n_full == 7
    assert fast.item() == pytest.approx(full.item(), rel=1e-6)


class Biggest(TorchFunctionMode):
    """Records the largest tensor any torch call returns while active (forward computations)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


N_ROWS, VOCAB = 37, 1000
PIECE = 4 * N_ROWS * 300  # bytes: vocabulary blocks of 300 (frozen head), chunks of 11 positions (trainable)


def _rows_and_head(trainable_head: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(N_ROWS, 6, generator=gen, requires_grad=True)
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=gen)
    targets[:4] = torch.tensor([0, 299, 300, VOCAB - 1])  # block edges
    head = torch.nn.Linear(6, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, 6, generator=gen))
    head.weight.requires_grad_(trainable_head)
    return rows, targets, head


def _loss_and_grads(fn, rows, head, bf16=False):
    rows.grad, head.weight.grad = None, None
    with Biggest() as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn()
    (loss / 9).backward()  # the trainer divides by the step's token count
    return loss.detach(), rows.grad.clone(), None if head.weight.grad is None else head.weight.grad.clone(), seen.most


@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_loss_equals_the_full_loss_and_gradients_without_whole_logits(trainable_head):
    rows, targets, head = _rows_and_head(trainable_head)
    full = lambda: torch.nn.functional.cross_entropy(head(rows).float(), targets, reduction="sum")  # noqa: E731
    want, want_rows, want_head, biggest_full = _loss_and_grads(full, rows, head)
    got, got_rows, got_head, biggest = _loss_and_grads(lambda: chunked_head_loss(rows, targets, head, PIECE), rows,
                                                       head)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_rows, want_rows, rtol=1e-5, atol=1e-6)
    if trainable_head:  # recomputed in backward: the weights still get their gradient
        torch.testing.assert_close(got_head, want_head, rtol=1e-5, atol=1e-6)
    else:
        assert got_head is None
    assert biggest_full >= N_ROWS * VOCAB and biggest <= N_ROWS * 300  # never the whole logits


def test_chunked_loss_under_bf16_autocast_stays_within_bf16_rounding():
    rows, targets, head = _rows_and_head(False)
    full = lambda: torch.nn.functional.cross_entropy(head(rows).float(), targets, reduction="sum")  # noqa: E731
    want, want_rows, _, _ = _loss_and_grads(full, rows, head, bf16=True)
    got, got_rows, _, biggest = _loss_and_grads(lambda: chunked_head_loss(rows, targets, head, PIECE), rows, head,
                                                bf16=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-3)
    torch.testing.assert_close(got_rows, want_rows, rtol=2e-2, atol=2e-3)
    assert biggest <= N_ROWS * 300  # one vocabulary block of logits at a time


def test_chunked_loss_without_grad_and_the_unchunked_path_unchanged():
    rows, targets, head = _rows_and_head(False)
    full = torch.nn.functional.cross_entropy(head(rows).float(), targets, reduction="sum")
    with torch.no_grad():
        assert chunked_head_loss(rows, targets, head, PIECE).item() == pytest.approx(full.item(), rel=1e-6)
    hidden = torch.cat([rows.detach(), torch.zeros(1, 6)]).unsqueeze(0)  # position t predicts labels[t + 1]
    labels = torch.cat([torch.tensor([IGNORE_INDEX]), targets]).unsqueeze(0)
    for chunk_bytes in (0, 4 * N_ROWS * VOCAB):  # no chunks, or the whole logits fit: the plain code, bit for bit
        loss, n = labelled_head_loss(hidden, labels, head, chunk_bytes)
        assert n == N_ROWS and torch.equal(loss, full)


def test_vocabulary_blocks_follow_the_megabytes():
    assert vocab_block(4 * 128, 12 * 2**20, 49152) == 6144  # SmolLM2, 4 x 128 positions, 12 MB
    assert vocab_block(10**6, 12 * 2**20, 49152) == 256  # never narrower
    assert vocab_block(4, 12 * 2**20, 800) == 800


def test_pad_hidden_right_pads_with_zeros():
    out = pad_hidden([torch.ones(2, 3), 2 * torch.ones(4, 3)])
    assert out.shape == (2, 4, 3)
    assert out[0, :2].eq(1).all() and out[0, 2:].eq(0).all() and out[1].eq(2).all()


def test_bucketed_batches_cover_every_example_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=103).tolist()
    order = rng.permutation(103).tolist()
    gen = torch.Generator().manual_seed(1)
    batches = bucketed_batches(lengths, order, batch_size=8, chunk_batches=4, generator=gen)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len(b) <= 8 for b in batches)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    plain = [order[s:s + 8] for s in range(0, 103, 8)]
    assert padding(batches) < 0.5 * padding(plain)
    for b in batches:  # each batch lies inside one chunk of 32 shuffled examples
        chunks = {order.index(i) // 32 for i in b}
        assert len(chunks) == 1
    with pytest.raises(ValueError, match="batch_size"):
        bucketed_batches(lengths, order, 0, 4, gen)


def test_cpu_flags_decide_autocast():
    assert cpu_has_native_bf16(CPUINFO_AMX) and not cpu_has_native_bf16(CPUINFO_AVX2)
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu, CPUINFO_AMX) is None
    assert autocast_dtype("bf16", cpu, CPUINFO_AVX2) is torch.bfloat16
    assert autocast_dtype("auto", cpu, CPUINFO_AVX2) is None
    assert autocast_dtype("auto", cpu, CPUINFO_AMX) is torch.bfloat16
    with pytest.raises(ValueError, match="train.autocast"):
        autocast_dtype("fp8", cpu)


def test_auto_autocast_measures_once_and_keeps_the_verdict(tmp_path):
    model = torch.nn.Linear(3, 3)
    cpu = torch.device("cpu")
    calls: list[object] = []

    def step(slow_bf16):
        def run(dtype):
            calls.append(dtype)
            end = time.process_time() + (0.02 if (dtype is not None) == slow_bf16 else 0.001)
            while time.process_time() < end:  # busy: the chooser times CPU time, not the wall clock
                pass
        return run

    verdicts = tmp_path / "autocast.json"
    # An AVX2-only CPU never times anything.
    assert AutocastChooser(verdicts).choose("auto", cpu, model, step(True), CPUINFO_AVX2) is None
    assert calls == [] and not verdicts.exists()
    # A bf16 CPU where bf16 is slower (the tiny model): off, and remembered on disk.
    assert AutocastChooser(verdicts).choose("auto", cpu, model, step(True), CPUINFO_AMX) is None
    assert None in calls and torch.bfloat16 in calls
    assert list(json.loads(verdicts.read_text()).values()) == [False]
    calls.clear()
    assert AutocastChooser(verdicts).choose("auto", cpu, model, step(False), CPUINFO_AMX) is None
    assert calls == []  # the stored verdict, no new timing
    # Another CPU model where bf16 is faster: bf16.
    other = CPUINFO_AMX.replace("New CPU", "Newer CPU")
    assert AutocastChooser(verdicts).choose("auto", cpu, model, step(False), other) is torch.bfloat16
    assert AutocastChooser(None).choose("bf16", cpu, model, step(True), CPUINFO_AVX2) is torch.bfloat16


# ---------------------------------------------------------------- fast paths on the tiny model


def test_labelled_logits_only_gives_the_same_loss(work_dir):
    model, tok = fresh(work_dir, small_lora(dropout=0.0))
    randomised(model).eval()
    for train_on_inputs in (True, False):
        batch, _ = batch_of(tok, TRAIN[:6], train_on_inputs)
        plain = FastForward(model, torch.device("cpu"), labelled_logits_only=False)
        fast = FastForward(model, torch.device("cpu"), labelled_logits_only=True)
        assert fast.head_only and not plain.head_only
        with torch.no_grad():
            (a, na), (b, nb) = plain.loss_sum(batch), fast.loss_sum(batch)
        assert na == nb and a.item() == pytest.approx(b.item(), rel=1e-5)


def test_loss_chunks_give_the_same_loss_and_training(work_dir):
    lora = small_lora(dropout=0.0)
    model, tok = fresh(work_dir, lora)
    randomised(model).eval()
    batch, _ = batch_of(tok, TRAIN[:6])
    vocab = decoder_parts(model).head.out_features
    assert vocab > 256  # two or more vocabulary blocks of the narrowest width
    tiny_chunks = 1e-3  # MB: blocks of 256 entries
    chunked = FastForward(model, torch.device("cpu"), loss_chunk_mb=tiny_chunks)
    with torch.no_grad():
        (a, na), (b, nb) = FastForward(model, torch.device("cpu")).loss_sum(batch), chunked.loss_sum(batch)
    assert na == nb and b.item() == pytest.approx(a.item(), rel=1e-6)

    def trained(**speed):
        m_, t_ = fresh(work_dir, lora)
        cfg = TrainSettings(batch_size=8, lr=1e-2, local_epochs=1, **{**PLAIN, "labelled_logits_only": True, **speed})
        result = train_local(m_, t_, TRAIN[:16], TITLES, cfg, seed=3, progress=False)
        return flatten_state(get_lora_state(m_)), result.loss

    (x, loss_x), (y, loss_y) = trained(loss_chunk_mb=0), trained(loss_chunk_mb=tiny_chunks)
    assert not np.allclose(x, flatten_state(get_lora_state(fresh(work_dir, lora)[0])))  # it trained
    np.testing.assert_allclose(x, y, atol=1e-4)  # Adam normalises tiny gradients: rounding shows a little
    assert loss_x == pytest.approx(loss_y, rel=1e-5)


def test_prefix_cache_only_when_lora_sits_in_the_last_layers(work_dir):
    everywhere, _ = fresh(work_dir, small_lora(dropout=0.0))
    top, tok = fresh(work_dir, small_lora(dropout=0.0, layers="2,3"))
    assert first_changing_layer(decoder_parts(everywhere)) == 0
    assert first_changing_layer(decoder_parts(top)) == 2
    assert FastForward(everywhere, torch.device("cpu"), prefix_cache_mb=64).prefix_start == 0
    assert FastForward(top, torch.device("cpu"), prefix_cache_mb=64).prefix_start == 2
    assert FastForward(top, torch.device("cpu"), prefix_cache_mb=0).prefix_start == 0


def test_prefix_cache_gives_the_same_loss_and_training(work_dir):
    lora = small_lora(dropout=0.0, layers="2,3")
    model, tok = fresh(work_dir, lora)
    randomised(model).eval()
    _, feats = batch_of(tok, TRAIN[:7])
    fast = FastForward(model, torch.device("cpu"), prefix_cache_mb=64)
    states = fast.prefix_states([f.input_ids for f in feats], batch_size=3)
    assert states is not None and [s.shape[0] for s in states] == [len(f.input_ids) for f in feats]
    batch = TrainCollator(tok.pad_token_id)(feats)
    batch_cached = dict(batch, prefix_hidden=pad_hidden(states))
    with torch.no_grad():
        plain, n = FastForward(model, torch.device("cpu"), labelled_logits_only=False).loss_sum(batch)
        cached, m = fast.loss_sum(batch_cached)
    assert n == m and cached.item() == pytest.approx(plain.item(), rel=1e-5)

    def trained(**speed):
        m_, t_ = fresh(work_dir, lora)
        cfg = TrainSettings(batch_size=4, lr=1e-2, local_epochs=2, **{**PLAIN, **speed})
        train_local(m_, t_, TRAIN[:16], TITLES, cfg, seed=3, progress=False)
        return flatten_state(get_lora_state(m_)), eval_loss(m_, t_, TRAIN[16:24], TITLES, cfg)

    (a, loss_a), (b, loss_b) = trained(), trained(prefix_cache_mb=64, labelled_logits_only=True)
    assert not np.allclose(a, flatten_state(get_lora_state(fresh(work_dir, lora)[0])))  # it trained
    np.testing.assert_allclose(a, b, atol=2e-4)
    assert loss_a == pytest.approx(loss_b, rel=1e-4)


def test_prefix_cache_is_renewed_when_the_prefix_weights_change(work_dir):
    model, tok = fresh(work_dir, small_lora(dropout=0.0, layers="3"))
    _, feats = batch_of(tok, TRAIN[:3])
    seqs = [f.input_ids for f in feats]
    fast = FastForward(model, torch.device("cpu"), prefix_cache_mb=64)
    before = [s.clone() for s in fast.prefix_states(seqs, 3)]
    assert all(torch.equal(x, y) for x, y in zip(before, fast.prefix_states(seqs, 3)))
    with torch.no_grad():  # someone changes a frozen prefix weight in place
        decoder_parts(model).decoder.layers[0].mlp.down_proj.weight.mul_(1.5)
    after = fast.prefix_states(seqs, 3)
    assert not any(torch.equal(x, y) for x, y in zip(before, after))


def test_prefix_cache_over_budget_falls_back_to_the_whole_model(work_dir):
    model, tok = fresh(work_dir, small_lora(dropout=0.0, layers="3"))
    _, feats = batch_of(tok, TRAIN[:3])
    tiny_budget = FastForward(model, torch.device("cpu"), prefix_cache_mb=1e-6)
    assert tiny_budget.prefix_states([f.input_ids for f in feats], 3) is None


def test_length_bucketing_trains_every_example_and_learns(work_dir):
    model, tok = fresh(work_dir, small_lora(dropout=0.0))
    cfg = TrainSettings(batch_size=8, lr=1e-2, local_epochs=2, length_bucketing=True, autocast="off")
    before = eval_loss(model, tok, TRAIN[100:140], TITLES, cfg)
    result = train_local(model, tok, TRAIN[:96], TITLES, cfg, seed=3, progress=False)
    assert result.steps == 2 * 12
    assert eval_loss(model, tok, TRAIN[100:140], TITLES, cfg) < before - 0.2
