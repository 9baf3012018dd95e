"""The built-in `tiny` model: a random LLaMA whose BPE tokenizer is trained on the catalogue.

It exists so that tests and the CPU default run need nothing from a model hub: a few
hundred thousand parameters, ~0.2 s per training step on 2 cores. The tokenizer is trained
with Hugging Face `tokenizers` on the item titles plus the BIGRec template, so prompts
tokenise into few tokens, and it is saved beside the prepared data to be reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Bump when the public warm-up changes, so cached warm weights are not reused.
PRETRAIN_RECIPE = "r2"

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


def public_prompts(item_ids: list[int], num_prompts: int, history_len: int, seed: int,
                   titles: dict[int, str] | None = None) -> list:
    """Prompts an outsider can build from the public catalogue alone (no interaction data).

    Histories are random titles. Half of the targets are random; the other half share a
    history title's first word (a franchise or series name), the kind of catalogue knowledge
    a real pretrained LLM brings ("Halo 3" after "Halo 2"). Without that half the warm-up
    would teach the model that the history is irrelevant to the answer.
    """
    import random

    from fellrec_flwr.prepared import Example

    rng = random.Random(seed)
    by_word: dict[str, list[int]] = {}
    for item in item_ids:
        words = (titles or {}).get(item, "").split()
        if words:
            by_word.setdefault(words[0].lower(), []).append(item)
    prompts = []
    for _ in range(num_prompts):
        history = tuple(rng.sample(item_ids, k=rng.randint(1, min(history_len, len(item_ids)))))
        target = rng.choice(item_ids)
        if titles and rng.random() < 0.5:
            anchor = (titles.get(rng.choice(history), "").split() or [""])[0].lower()
            related = [i for i in by_word.get(anchor, []) if i not in history]
            if related:
                target = rng.choice(related)
        prompts.append(Example(user_id=-1, history=history, target=target))
    return prompts


def pretrain_on_catalogue(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, titles: dict[int, str],
                          num_prompts: int, seed: int = 0, history_len: int = 10) -> float:
    """Full-model warm-up of the random tiny LLaMA on public catalogue prompts; returns the last loss."""
    from fellrec_flwr.config import TrainSettings
    from fellrec_flwr.trainer import train_local

    prompts = public_prompts(sorted(titles), num_prompts, history_len, seed, titles)
    settings = TrainSettings(local_epochs=2, lr=3e-3, batch_size=16, max_length=256, train_on_inputs=True)
    result = train_local(model, tokenizer, prompts, titles, settings, seed=seed, progress=True)
    model.eval()
    return result.loss


def load_or_pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, titles: dict[int, str],
                     num_prompts: int, cache_file: Path) -> LlamaForCausalLM:
    """Pretrained tiny weights from `cache_file`, or pretrain once and save them there (atomically)."""
    from safetensors.torch import load_file, save_file

    if num_prompts <= 0:
        return model
    if cache_file.exists():
        model.load_state_dict(load_file(str(cache_file)))
        return model
    pretrain_on_catalogue(model, tokenizer, titles, num_prompts)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
    os.close(fd)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, cache_file)
    return model
