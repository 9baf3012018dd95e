"""The BIGRec prompt text, and its encoding into token ids, labels and padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fellrec_flwr.model import tiny
from fellrec_flwr.data.collate import (
    IGNORE_INDEX,
    TrainCollator,
    UnknownItemError,
    encode_example,
    encode_examples,
    encode_prompt,
    generation_batch,
    prompt_token_ids,
    response_token_ids,
)
from fellrec_flwr.data.prompts import MOVIES, build_prompt, extract_response, format_response, template_texts

EXPECTED_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
Given a list of video games the user has played before, please recommend a new video game that the user likes to the user.

### Input:
The user has played the following video games before: "Halo 3", "Portal 2 - PC"

### Response:
"""


def test_prompt_matches_the_bigrec_template_exactly():
    assert build_prompt(["Halo 3", "Portal 2 - PC"]) == EXPECTED_PROMPT
    assert format_response("Doom - PC") == '"Doom - PC"'


def test_domain_changes_only_the_item_words():
    movie = build_prompt(["Heat"], MOVIES)
    assert "Given a list of movies the user has watched before, please recommend a new movie" in movie
    assert 'The user has watched the following movies before: "Heat"' in movie
    assert movie.endswith("### Response:\n")


@pytest.mark.parametrize("generated, title", [
    (EXPECTED_PROMPT + '"Doom - PC"', "Doom - PC"),
    (EXPECTED_PROMPT + '  "Doom - PC"  \n### Instruction: more', "Doom - PC"),
    ('"Doom - PC"\n"Quake"', "Doom - PC"),  # generation without the prompt
    ("### Response:\n\n Quake II \n", "Quake II"),
    (EXPECTED_PROMPT, ""),
])
def test_extract_response(generated, title):
    assert extract_response(generated) == title


# ---------------------------------------------------------------- encoding (collate)

TITLES = {i: f"Quest {chr(65 + i % 26)}{i} - Deluxe" for i in range(40)}


@dataclass(frozen=True)
class Ex:
    user_id: int
    history: tuple[int, ...]
    target: int


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = template_texts() + list(TITLES.values())
    return tiny.train_tokenizer(texts, 600, tmp_path_factory.mktemp("tok") / "tokenizer")


def test_sequence_is_bos_prompt_response_eos(tok):
    enc = encode_example(tok, [TITLES[1], TITLES[2]], TITLES[3], max_length=512)
    prompt = build_prompt([TITLES[1], TITLES[2]])
    expected = ([tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
                + tok(f'"{TITLES[3]}"', add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    assert enc.input_ids == expected
    assert tok.decode(enc.input_ids, skip_special_tokens=True) == prompt + f'"{TITLES[3]}"'
    assert enc.labels == enc.input_ids  # train_on_inputs=True: loss over everything


def test_train_on_inputs_false_masks_exactly_the_prompt(tok):
    enc = encode_example(tok, [TITLES[1], TITLES[2]], TITLES[3], max_length=512, train_on_inputs=False)
    n_prompt = len(prompt_token_ids(tok, build_prompt([TITLES[1], TITLES[2]])))
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:] == response_token_ids(tok, TITLES[3])
    assert enc.labels[-1] == tok.eos_token_id


def test_truncation_drops_oldest_titles_and_keeps_the_target(tok):
    history = [TITLES[i] for i in range(10)]
    full = encode_example(tok, history, TITLES[20], max_length=10_000)
    short = encode_example(tok, history, TITLES[20], max_length=len(full.input_ids) - 1)
    expected = encode_example(tok, history[1:], TITLES[20], max_length=10_000)
    assert short.input_ids == expected.input_ids  # exactly the oldest title went
    # one title cannot fit: cut from the right at max_length (BIGRec's behaviour)
    tiny_cut = encode_example(tok, history, TITLES[20], max_length=20)
    assert len(tiny_cut.input_ids) == len(tiny_cut.labels) == 20


def test_generation_prompt_fits_and_ends_with_the_marker(tok):
    history = [TITLES[i] for i in range(10)]
    ids = encode_prompt(tok, history, max_length=60)
    assert len(ids) <= 60 and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True).endswith("### Response:\n")
    batch = generation_batch(tok, [history[:1], history], max_length=512)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    first = batch["attention_mask"][0]
    assert first[0] == 0 and first[-1] == 1  # left padding
    assert batch["input_ids"][0, 0] == tok.pad_token_id


def test_collator_right_pads_with_ignored_labels(tok):
    feats = encode_examples(tok, [Ex(0, (1,), 2), Ex(1, (3, 4, 5, 6), 7)], TITLES, max_length=512)
    batch = TrainCollator(tok.pad_token_id)(feats)
    short, long_ = (len(f.input_ids) for f in feats)
    assert batch["input_ids"].shape == (2, long_)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (long_ - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (long_ - short)
    assert batch["input_ids"][0, short:].tolist() == [tok.pad_token_id] * (long_ - short)
    assert torch.equal(batch["labels"][1], torch.tensor(feats[1].labels))


def test_unknown_item_is_a_clear_error(tok):
    with pytest.raises(UnknownItemError, match="item id 99"):
        encode_examples(tok, [Ex(0, (1, 99), 2)], TITLES, max_length=512)
