"""The BIGRec prompt (Alpaca style), exactly as in ../shared/notes/fellrec-method.md §2.

A training sequence is ``build_prompt(history) + format_response(target)`` followed by
the tokenizer's end-of-sequence token (added in :mod:`fellrec_flwr.data.collate`). At
inference the model continues ``build_prompt(history)`` and :func:`extract_response`
reads the generated title back.

The domain wording ("video games", "played") is the only variable part; it is a module
constant (``GAMES``) passed as a default argument, so a movie catalogue uses
``MOVIES`` without changing the template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

RESPONSE_MARKER = "### Response:\n"

PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class PromptDomain:
    """The words that name the items and the interaction in the prompt."""

    singular: str  # "video game"
    plural: str  # "video games"
    verb: str  # past participle: "played"


GAMES = PromptDomain(singular="video game", plural="video games", verb="played")
MOVIES = PromptDomain(singular="movie", plural="movies", verb="watched")


def instruction(domain: PromptDomain = GAMES) -> str:
    return (
        f"Given a list of {domain.plural} the user has {domain.verb} before, please recommend "
        f"a new {domain.singular} that the user likes to the user."
    )


def history_input(history_titles: Sequence[str], domain: PromptDomain = GAMES) -> str:
    quoted = ", ".join(f'"{title}"' for title in history_titles)
    return f"The user has {domain.verb} the following {domain.plural} before: {quoted}"


def build_prompt(history_titles: Sequence[str], domain: PromptDomain = GAMES) -> str:
    """Everything the model is given, up to and including ``"### Response:\\n"``.

    ``history_titles`` is oldest first, as in the prepared data.
    """
    return (
        f"{PREAMBLE}\n\n"
        f"### Instruction:\n{instruction(domain)}\n\n"
        f"### Input:\n{history_input(history_titles, domain)}\n\n"
        f"{RESPONSE_MARKER}"
    )


def format_response(title: str) -> str:
    """The target the model learns to write: the title in double quotes (EOS is added by collate)."""
    return f'"{title}"'


def extract_response(generated_text: str) -> str:
    """The recommended title in a generation (with or without the prompt in front).

    Takes the text after the last response marker (the whole text when there is none),
    keeps its first non-empty line and strips whitespace and the surrounding quotes.
    """
    _, marker, after = generated_text.rpartition(RESPONSE_MARKER.rstrip("\n"))
    text = after if marker else generated_text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first.strip().strip('"').strip()


def template_texts(domain: PromptDomain = GAMES) -> list[str]:
    """The fixed words of the template, for training a tokenizer that knows them."""
    return [PREAMBLE, instruction(domain), history_input([], domain), RESPONSE_MARKER,
            build_prompt(["A", "B"], domain) + format_response("C")]
