"""Breakdowns by history length and target popularity (fellrec_flwr/eval/breakdown.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fellrec_flwr.eval import breakdown as bd


def test_history_buckets():
    assert [bd.history_bucket(n) for n in (1, 2, 3, 5, 6, 10, 11, 40)] == [
        "history 1-2", "history 1-2", "history 3-5", "history 3-5", "history 6-10", "history 6-10",
        "history 11+", "history 11+"]
    with pytest.raises(ValueError, match="must be >= 1"):
        bd.history_bucket(0)


def test_head_groups_hold_half_of_the_interactions():
    counts = np.array([1, 50, 3, 30, 16])  # 100 interactions: 50 alone is half
    assert bd.head_groups(counts).tolist() == [False, True, False, False, False]
    assert bd.head_groups(counts, share=0.6).tolist() == [False, True, False, True, False]
    assert not bd.head_groups(np.zeros(3)).any()


def test_breakdown_means_and_differences_are_the_buckets_own():
    users = np.arange(12)
    buckets = pd.DataFrame({"user_id": users, "history": ["history 1-2"] * 6 + ["history 3-5"] * 6,
                            "popularity": ["head target", "tail target"] * 6})
    llm = pd.Series([0, 3, -1, 12, 0, -1, 5, 5, -1, -1, 9, 0], index=users)
    markov = pd.Series([-1, 0, 0, -1, -1, -1, 0, 1, 2, 3, 4, 5], index=users)
    frame = bd.breakdown({"llm": llm, "markov": markov}, buckets, references=("markov",), replicates=200)
    own = frame[(frame["metric"] == "recall@10") & (frame["reference"] == "")].set_index(["bucket", "method"])
    hits = lambda r: ((r >= 0) & (r < 10)).astype(float)  # noqa: E731
    assert own.loc[("history 1-2", "llm"), "value"] == pytest.approx(hits(llm[:6]).mean())
    assert own.loc[("history 3-5", "markov"), "value"] == pytest.approx(hits(markov[6:]).mean())
    assert own.loc[("tail target", "llm"), "n_users"] == 6
    diff = frame[(frame["metric"] == "recall@10") & (frame["reference"] == "markov")].set_index("bucket")
    assert diff.loc["all users", "value"] == pytest.approx(hits(llm).mean() - hits(markov).mean())
    assert set(frame["bucket"]) == {"all users", "history 1-2", "history 3-5", "head target", "tail target"}
