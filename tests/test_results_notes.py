"""Plots whose metric is zero for every client say so instead of looking broken."""

from __future__ import annotations

import pandas as pd

from fellrec_flwr.eval.results import plot_run, zero_note


def test_zero_note_only_when_every_client_is_zero():
    assert zero_note({"Recall@10": pd.Series([0.0, 0.0])}).startswith("Recall@10 = 0 for every client")
    assert zero_note({"Recall@10": pd.Series([0.0, 0.1])}) == ""
    assert zero_note({"recall@10": [0.0], "ndcg@10": [0.0]}).startswith("recall@10 and ndcg@10 = 0")
    assert zero_note({"recall@10": []}) == ""  # nothing plotted, nothing to explain


def test_all_zero_run_still_plots(tmp_path):
    rows = [{"round": r, "client": c, "split": s, "metric": m, "value": 0.0}
            for r in (1, 2) for c in (0, 1) for s in ("valid", "test") for m in ("recall@10", "ndcg@10")]
    rows += [{"round": 2, "client": c, "split": "test", "metric": "num-examples", "value": 5} for c in (0, 1)]
    written = plot_run(pd.DataFrame(rows), tmp_path, "zero")
    assert [p.name for p in written] == ["recall_by_round.png", "final_by_client.png"]
    assert all(p.stat().st_size > 1000 for p in written)
