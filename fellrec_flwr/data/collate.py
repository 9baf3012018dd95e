"""Turn examples (history item ids -> target item id) into token ids, labels and batches.

One sequence = ``[BOS] + prompt + '"Target Title"' + [EOS]``. The prompt and the response
are tokenised separately and concatenated, so the prompt tokens are exactly the ones
the model is given at generation time (:func:`encode_prompt`) and the label mask for
``train_on_inputs=False`` is exact (BIGRec tokenises the whole text and masks by the
prompt's length, which can be off by a merged token).

Truncation (our choice, BIGRec instead cuts the whole text at the cutoff from the right,
which can cut off the target): when a sequence is longer than ``max_length``, the oldest
history titles are dropped, one at a time, until it fits; at least one title is kept.
Only if one title still does not fit is the sequence cut from the right, as BIGRec does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from fellrec_flwr.data.prompts import GAMES, PromptDomain, build_prompt, format_response

IGNORE_INDEX = -100  # label value ignored by the loss


class UnknownItemError(ValueError):
    """An example refers to an item id that has no title."""


class EncodingError(ValueError):
    """The tokenizer cannot encode the sequences as needed (e.g. it has no EOS token)."""


class ExampleLike(Protocol):
    """What collate needs from `prepared.Example`."""

    history: Sequence[int]
    target: int


Titles = Mapping[int, str] | Sequence[str]


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


def lookup_titles(item_ids: Sequence[int], titles: Titles) -> list[str]:
    """Titles of `item_ids`; `titles` maps item id -> title (a dict, or a list indexed by id)."""
    out = []
    for item in item_ids:
        try:
            out.append(titles[int(item)])
        except (KeyError, IndexError):
            raise UnknownItemError(
                f"item id {item} has no title in the catalogue ({len(titles)} titles); "
                "the examples and the titles must come from the same prepared folder."
            ) from None
    return out


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """BOS (when the tokenizer has one) + the prompt's tokens, without any other specials.

    Special tokens are added by hand because tokenizers disagree on adding them
    (LLaMA adds BOS, the GGUF SmolLM2 and the tiny tokenizer add nothing).
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def response_token_ids(tokenizer: PreTrainedTokenizerBase, target_title: str) -> list[int]:
    """'"Title"' + EOS: the EOS teaches the model to stop after one title."""
    if tokenizer.eos_token_id is None:
        raise EncodingError("the tokenizer has no EOS token; set tokenizer.eos_token before training.")
    ids = tokenizer(format_response(target_title), add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    history_titles: Sequence[str],
    target_title: str,
    max_length: int,
    train_on_inputs: bool = True,
    domain: PromptDomain = GAMES,
) -> EncodedExample:
    """Token ids and labels of one training sequence (see the module doc for truncation)."""
    response = response_token_ids(tokenizer, target_title)
    history = list(history_titles)
    prompt = prompt_token_ids(tokenizer, build_prompt(history, domain))
    while len(prompt) + len(response) > max_length and len(history) > 1:
        history = history[1:]  # drop the oldest title
        prompt = prompt_token_ids(tokenizer, build_prompt(history, domain))
    input_ids = (prompt + response)[:max_length]
    prompt_labels = list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)
    labels = (prompt_labels + response)[:max_length]
    return EncodedExample(input_ids=input_ids, labels=labels)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ExampleLike],
    titles: Titles,
    max_length: int,
    train_on_inputs: bool = True,
    domain: PromptDomain = GAMES,
) -> list[EncodedExample]:
    """Encode prepared examples (history item ids, target item id) with the catalogue titles."""
    return [
        encode_example(tokenizer, lookup_titles(ex.history, titles), lookup_titles([ex.target], titles)[0],
                       max_length, train_on_inputs, domain)
        for ex in examples
    ]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    history_titles: Sequence[str],
    max_length: int,
    domain: PromptDomain = GAMES,
) -> list[int]:
    """Prompt token ids for generation, shortened like training sequences (oldest titles first).

    If one title alone is still too long, the prompt's start is cut instead (keeping BOS),
    because its end ("### Response:") is what the model must continue from.
    """
    history = list(history_titles)
    prompt = prompt_token_ids(tokenizer, build_prompt(history, domain))
    while len(prompt) > max_length and len(history) > 1:
        history = history[1:]
        prompt = prompt_token_ids(tokenizer, build_prompt(history, domain))
    if len(prompt) > max_length:
        keep_bos = 1 if tokenizer.bos_token_id is not None else 0
        prompt = prompt[:keep_bos] + prompt[len(prompt) - (max_length - keep_bos):]
    return prompt


def pad_token_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        raise EncodingError("the tokenizer has no pad token; load it with model.load_base_model, "
                            "which sets one.")
    return pad


class TrainCollator:
    """Right-pads a list of :class:`EncodedExample` into tensors for a causal-LM step.

    Padding gets attention 0 and label IGNORE_INDEX (labels are padded explicitly, never
    derived from the pad id, because some tokenizers use EOS as the pad token).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        width = max(len(f.input_ids) for f in features)
        input_ids, attention, labels = [], [], []
        for f in features:
            pad = width - len(f.input_ids)
            input_ids.append(f.input_ids + [self.pad_token_id] * pad)
            attention.append([1] * len(f.input_ids) + [0] * pad)
            labels.append(f.labels + [IGNORE_INDEX] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


def bucketed_batches(lengths: Sequence[int], order: Sequence[int], batch_size: int, chunk_batches: int,
                     generator: torch.Generator) -> list[list[int]]:
    """Batches of indices with similar lengths, still random: less padding per batch.

    The shuffled `order` is cut into chunks of ``chunk_batches * batch_size`` examples; each
    chunk is sorted by length and cut into batches; then the batches of all chunks are
    shuffled, so an epoch does not go from short to long. ``chunk_batches=1`` keeps the
    plain shuffled batches (in shuffled batch order).
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"batch_size={batch_size} and chunk_batches={chunk_batches} must be >= 1.")
    chunk = batch_size * chunk_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])  # stable: ties keep shuffled order
        batches.extend(part[b:b + batch_size] for b in range(0, len(part), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompt ids for batched generation (new tokens are appended on the right)."""
    width = max(len(p) for p in prompts)
    input_ids = [[pad_token_id] * (width - len(p)) + list(p) for p in prompts]
    attention = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long)}


def generation_batch(
    tokenizer: PreTrainedTokenizerBase,
    histories: Sequence[Sequence[str]],
    max_length: int,
    domain: PromptDomain = GAMES,
) -> dict[str, Any]:
    """Left-padded ``input_ids``/``attention_mask`` of the prompts of several users."""
    prompts = [encode_prompt(tokenizer, h, max_length, domain) for h in histories]
    return left_pad(prompts, pad_token_id_of(tokenizer))
