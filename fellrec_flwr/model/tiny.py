"""The built-in `tiny` model: a random LLaMA whose BPE tokenizer is trained on the catalogue.

It exists so that tests and the CPU default run need nothing from a model hub: a few
hundred thousand parameters, ~0.2 s per training step on 2 cores. The tokenizer is trained
with Hugging Face `tokenizers` on the item titles plus the BIGRec template, so prompts
tokenise into few tokens, and it is saved beside the prepared data to be reused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Bump when the public warm-up changes, so cached warm weights are not reused.
PRETRAIN_RECIPE = "r4"
# Steps = model.tiny-pretrain-prompts / 16 x 6 epochs. On the demo, constrained Recall@10 of
# the warm model is at popularity level up to ~375 steps (it knows the titles and their
# marginal) and follows the history from ~500 (0.30 at 750; bench/tiny_warmup_curve.py).
# The default 1,000 prompts (~375 steps) leave following the history to federated training,
# so the demo's curve shows what the clients learn (docs/results.md).
PRETRAIN_EPOCHS = 6
PRETRAIN_LR = 3e-3

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and save it to `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").exists():
        return load_tokenizer(out_dir)
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.padding_side = "left"  # generation pads on the left
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=out_dir.parent))
    fast.save_pretrained(tmp)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process won the race: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.padding_side = "left"
    return tok


def tiny_config(vocab_size: int, hidden: int = 64, layers: int = 4, heads: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 4,
                     heads: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """A random LLaMA sized for the tokenizer; same seed -> same weights."""
    config = tiny_config(len(tokenizer), hidden, layers, heads)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _title_ids(titles: Mapping[int, str]) -> dict[str, int]:
    """title -> smallest item id with that title (a title group's representative)."""
    out: dict[str, int] = {}
    for item in sorted(titles):
        out.setdefault(titles[item], item)
    return out


def demo_public_sequences(titles: Mapping[int, str], num_users: int, seed: int = 0) -> list[list[int]] | None:
    """Item-id sequences of synthetic PUBLIC demo users, or None when `titles` is not the demo catalogue.

    The users come from the demo generator with its public seed (`data_prep.demo`): same
    catalogue and behaviour rules (series followed in order, genres), no taste groups, and
    never the clients' users. Titles the prepared catalogue lacks are dropped.
    """
    from fellrec_flwr.data.on_demand import public_demo_title_sequences

    ids = _title_ids(titles)
    sequences = public_demo_title_sequences(num_users, seed_offset=seed)
    known = sum(t in ids for s in sequences for t in s) / max(1, sum(len(s) for s in sequences))
    if known < 0.9:  # another catalogue (e.g. Games): the demo world says nothing about it
        return None
    return [[ids[t] for t in s if t in ids] for s in sequences]


def franchise_sequences(titles: Mapping[int, str]) -> list[list[int]]:
    """Public catalogue knowledge for a non-demo catalogue: titles sharing a first word, in title order.

    A franchise ("Halo", "Halo 2", "Halo 3") is played in order, the kind of knowledge a
    real pretrained LLM brings; no interaction data is used.
    """
    by_word: dict[str, list[tuple[str, int]]] = {}
    for title, item in _title_ids(titles).items():
        words = title.split()
        if words:
            by_word.setdefault(words[0].lower(), []).append((title, item))
    return [[item for _, item in sorted(group)] for group in by_word.values() if len(group) >= 2]


def sequence_windows(sequences: Sequence[Sequence[int]], history_len: int) -> list[tuple[tuple[int, ...], int]]:
    """Every (history, next item) window of every sequence, as the clients' training prompts are built."""
    return [(tuple(seq[max(0, j - history_len):j]), int(seq[j])) for seq in sequences for j in range(1, len(seq))]


def public_prompts(item_ids: list[int], num_prompts: int, history_len: int, seed: int,
                   titles: dict[int, str] | None = None) -> list:
    """`num_prompts` warm-up prompts an outsider can build without any client's data.

    On the demo catalogue: windows of synthetic public users drawn from the demo world
    (`demo_public_sequences`), so the model learns the titles AND the task with real
    structure (a sequel after its predecessor, genres kept). On another catalogue: windows
    of its franchises in title order (`franchise_sequences`). Never random histories: those
    teach the model that the history does not matter.
    """
    import random

    from fellrec_flwr.data.prepared import Example

    if not titles:
        raise ValueError("public_prompts needs the catalogue titles (item id -> title).")
    titles = {i: titles[i] for i in item_ids}
    rng = random.Random(seed)
    # ~11 windows per demo user (sequences of 5-20 items): draw enough users for num_prompts.
    sequences = demo_public_sequences(titles, max(50, num_prompts // 8), seed) or franchise_sequences(titles)
    windows = sequence_windows(sequences, history_len)
    if not windows:
        raise ValueError("no public warm-up prompts: the catalogue has no franchise of 2+ titles and is not the "
                         "demo's. Set model.tiny-pretrain-prompts=0 to skip the warm-up.")
    picked = rng.sample(windows, num_prompts) if num_prompts <= len(windows) else \
        [rng.choice(windows) for _ in range(num_prompts)]
    return [Example(user_id=-1, history=h, target=t) for h, t in picked]


def pretrain_on_catalogue(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, titles: dict[int, str],
                          num_prompts: int, seed: int = 0, history_len: int = 10) -> float:
    """Full-model warm-up of the random tiny LLaMA on public prompts (`public_prompts`); returns the last loss."""
    from fellrec_flwr.config import TrainSettings
    from fellrec_flwr.train.trainer import train_local

    prompts = public_prompts(sorted(titles), num_prompts, history_len, seed, titles)
    settings = TrainSettings(local_epochs=PRETRAIN_EPOCHS, lr=PRETRAIN_LR, batch_size=16, max_length=256,
                             train_on_inputs=True)
    print(f"[tiny] public warm-up of the random tiny model: {len(prompts)} prompts of synthetic public users "
          f"(none of the clients'), {PRETRAIN_EPOCHS} epochs; runs once, then cached", flush=True)
    t0 = time.time()
    result = train_local(model, tokenizer, prompts, titles, settings, seed=seed, progress=True)
    print(f"[tiny] public warm-up done in {time.time() - t0:.0f}s, loss {result.loss:.3f}", flush=True)
    model.eval()
    return result.loss


def load_or_pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, titles: dict[int, str],
                     num_prompts: int, cache_file: Path) -> LlamaForCausalLM:
    """Pretrained tiny weights from `cache_file`, or pretrain once and save them there (atomically).

    A file lock makes simultaneous processes (simulated clients starting together) wait for
    the one that trains instead of each training its own copy.
    """
    from safetensors.torch import load_file, save_file

    if num_prompts <= 0:
        return model
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_file.parent / f".{cache_file.name}.lock"):
        if cache_file.exists():
            model.load_state_dict(load_file(str(cache_file)))
            print(f"[tiny] public warm-up: cached weights {cache_file.name}", flush=True)
            return model
        pretrain_on_catalogue(model, tokenizer, titles, num_prompts)
        fd, tmp = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
        os.close(fd)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, cache_file)
    return model


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
