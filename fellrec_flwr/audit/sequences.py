"""What the client sends, token by token, and where the private parts of it are.

A training sequence is encoded exactly as :mod:`fellrec_flwr.data.collate` encodes it (BOS +
prompt + '"Target"' + EOS, oldest history titles dropped until it fits ``max_length``), so
the audited tokens are the ones a client really pushes through its first layers. On top
of the token ids we record, for every history title and for the target title, the token
positions it occupies (a *span*): the audit scores recovery on those positions only,
because the template around them is public.

Two sources of sequences:

- the attacker's: :func:`synthetic_histories` draws random histories of catalogue items
  (the catalogue and the template are public), used to train the inverter;
- the victims': real users' leave-one-out test prompts (:func:`real_examples`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fellrec_flwr.data.collate import prompt_token_ids, response_token_ids
from fellrec_flwr.data.prompts import GAMES, PromptDomain, build_prompt, format_response, history_input


class AuditError(ValueError):
    """Bad input to the privacy audit (unknown cut, empty data, unknown item...)."""


@dataclass(frozen=True)
class Span:
    """Token positions ``[start, end)`` of one quoted title, and the item it names."""

    start: int
    end: int
    item_id: int


@dataclass(frozen=True)
class AuditSequence:
    """One training sequence as token ids plus the spans of its private titles."""

    input_ids: tuple[int, ...]
    history: tuple[Span, ...]  # history titles that fit (oldest dropped first, as collate does)
    target: Span | None  # None when the target was cut off by max_length
    response_start: int  # first token of '"Target"' (the loss starts here when train_on_inputs=False)

    @property
    def private_positions(self) -> np.ndarray:
        """Every token position inside a history or target title span."""
        spans = list(self.history) + ([self.target] if self.target else [])
        return np.array([p for s in spans for p in range(s.start, s.end)], dtype=np.int64)


def title_char_ranges(history_titles: Sequence[str], domain: PromptDomain = GAMES) -> list[tuple[int, int]]:
    """Character ranges of each history title inside ``build_prompt(history_titles)``.

    Walks the quoted list the template writes (``"A", "B", ...``) and checks every range,
    so a change of the template fails loudly here instead of silently mis-scoring.
    """
    prompt = build_prompt(history_titles, domain)
    start = prompt.find(history_input(history_titles, domain))
    if start < 0:
        raise AuditError("prompts.build_prompt no longer contains prompts.history_input; update the audit.")
    cursor = start + len(history_input([], domain))
    ranges = []
    for title in history_titles:
        cursor += 1  # opening quote
        ranges.append((cursor, cursor + len(title)))
        if prompt[cursor:cursor + len(title)] != title:
            raise AuditError("the history titles are not quoted as the audit expects ('\"A\", \"B\"'); "
                             "update audit.sequences.title_char_ranges to the new template.")
        cursor += len(title) + 3  # closing quote, comma, space
    return ranges


def _token_spans(offsets: Sequence[tuple[int, int]], ranges: Sequence[tuple[int, int]],
                 shift: int) -> list[tuple[int, int]]:
    """Token index ranges overlapping each character range (token i -> position i + shift)."""
    spans = []
    for lo, hi in ranges:
        hits = [i for i, (a, b) in enumerate(offsets) if a < hi and b > lo]
        if not hits:
            raise AuditError(f"no token covers characters {lo}..{hi}; the tokenizer gives no offsets?")
        spans.append((hits[0] + shift, hits[-1] + 1 + shift))
    return spans


def encode_sequence(tokenizer, titles: Mapping[int, str], history: Sequence[int], target: int,
                    max_length: int, domain: PromptDomain = GAMES) -> AuditSequence:
    """Token ids as collate sends them, with the token span of every private title."""
    try:
        history_titles = [titles[int(i)] for i in history]
        target_title = titles[int(target)]
    except KeyError as err:
        raise AuditError(f"item id {err.args[0]} has no title; pass the catalogue the examples come from.") from None
    history = [int(i) for i in history]
    response = response_token_ids(tokenizer, target_title)
    prompt = prompt_token_ids(tokenizer, build_prompt(history_titles, domain))
    while len(prompt) + len(response) > max_length and len(history_titles) > 1:  # collate's policy
        history, history_titles = history[1:], history_titles[1:]
        prompt = prompt_token_ids(tokenizer, build_prompt(history_titles, domain))
    input_ids = (prompt + response)[:max_length]
    offsets = tokenizer(build_prompt(history_titles, domain), add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    bos = len(prompt) - len(offsets)  # prompt_token_ids puts BOS (if any) in front of the same tokens
    spans = _token_spans(offsets, title_char_ranges(history_titles, domain), shift=bos)
    history_spans = tuple(Span(a, b, item) for (a, b), item in zip(spans, history) if b <= max_length)
    reply = format_response(target_title)
    lo = reply.find(target_title)
    reply_offsets = tokenizer(reply, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ((a, b),) = _token_spans(reply_offsets, [(lo, lo + len(target_title))], shift=len(prompt))
    target_span = Span(a, b, int(target)) if b <= max_length else None
    return AuditSequence(tuple(input_ids), history_spans, target_span, len(prompt))


def synthetic_histories(item_ids: Sequence[int], n: int, history_len: int, seed: int,
                        min_len: int = 3) -> list[tuple[list[int], int]]:
    """The attacker's training prompts: ``n`` (history, target) pairs of distinct random items.

    Items are drawn uniformly (the attacker knows the catalogue, not its popularity);
    history lengths are uniform in ``[min_len, history_len]``.
    """
    ids = np.asarray(list(item_ids), dtype=np.int64)
    if len(ids) < history_len + 1:
        raise AuditError(f"the catalogue has {len(ids)} items; the attacker needs more than history_len={history_len}.")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(min(min_len, history_len), history_len + 1))
        picks = rng.choice(ids, size=length + 1, replace=False)
        out.append(([int(i) for i in picks[:-1]], int(picks[-1])))
    return out


def real_examples(sequences: Mapping[int, Sequence[int]], n_users: int, history_len: int,
                  seed: int) -> list[tuple[int, list[int], int]]:
    """``n_users`` random users' leave-one-out TEST prompts: (user, last history_len items, last item)."""
    users = sorted(u for u, s in sequences.items() if len(s) >= 2)
    if not users:
        raise AuditError("no user has two or more interactions; nothing to audit.")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(users, size=min(n_users, len(users)), replace=False).tolist())
    return [(int(u), [int(i) for i in sequences[u][:-1][-history_len:]], int(sequences[u][-1])) for u in chosen]
