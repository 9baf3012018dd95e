"""Ground recovered text to catalogue items: did the attacker identify the item?

A recovered title span (the attacker's tokens at a title's positions, decoded to text)
identifies item i when, among all catalogue titles, the one whose word set overlaps it best
(F1 of lower-cased words) is i's title, with F1 >= ``threshold`` (0.8). Items that share one
title string form one *title group* (as in :mod:`fellrec_flwr.eval.grounding`): finding the
title is finding the item, whichever id it has. Ties at the best F1 count as identified
when the true group is among them (the attacker learns a tiny candidate set).

Scoring the true span boundaries gives the attacker the segmentation for free; the
quotes and commas of the template make segmenting easy anyway, and a privacy audit should
err on the attacker's side.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

from fellrec_flwr.eval.grounding import TitleGroups

WORD_PATTERN = r"(?u)\b\w+\b"
F1_THRESHOLD = 0.8


class TitleMatcher:
    """Word-set F1 of a text against every catalogue title group."""

    def __init__(self, titles: Mapping[int, str]):
        self.groups = TitleGroups.from_titles(titles)
        self.vectorizer = CountVectorizer(binary=True, lowercase=True, token_pattern=WORD_PATTERN, dtype=np.float32)
        self.matrix = self.vectorizer.fit_transform(self.groups.titles).T.tocsr()  # (words, groups)
        self.sizes = np.asarray(self.matrix.sum(0)).ravel()

    def f1(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), groups) word-set F1 (0 where a text or a title has no words)."""
        query = self.vectorizer.transform(list(texts))
        overlap = (query @ self.matrix).toarray()
        q_sizes = np.asarray(query.sum(1)).ravel()
        denom = q_sizes[:, None] + self.sizes[None, :]
        return np.divide(2 * overlap, denom, out=np.zeros_like(overlap), where=denom > 0)

    def identified(self, texts: Sequence[str], item_ids: Sequence[int], threshold: float = F1_THRESHOLD,
                   chunk: int = 256) -> np.ndarray:
        """Bool per text: does it ground to the title group of the matching item id?"""
        truth = self.groups.group_index(item_ids)
        out = np.zeros(len(texts), dtype=bool)
        for i in range(0, len(texts), chunk):
            scores = self.f1(texts[i:i + chunk])
            best = scores.max(1)
            mine = scores[np.arange(len(scores)), truth[i:i + chunk]]
            out[i:i + chunk] = (mine >= threshold) & (mine >= best)
        return out

    def in_top(self, texts: Sequence[str], item_ids: Sequence[int], k: int = 5, chunk: int = 256) -> np.ndarray:
        """Bool per text: is the item's title group among the attacker's ``k`` best guesses?

        The guesses are the title groups ranked by word-set F1 with the text; the item counts when it
        overlaps the text at all and fewer than ``k`` other groups score at least as high (ties go
        against the attacker here, so a word shared by many titles does not count as a hit).
        """
        truth = self.groups.group_index(item_ids)
        out = np.zeros(len(texts), dtype=bool)
        for i in range(0, len(texts), chunk):
            scores = self.f1(texts[i:i + chunk])
            mine = scores[np.arange(len(scores)), truth[i:i + chunk]]
            others = (scores >= mine[:, None]).sum(1) - 1
            out[i:i + chunk] = (mine > 0) & (others < k)
        return out
