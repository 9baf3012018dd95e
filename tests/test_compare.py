"""compare: side-by-side table, balance columns and plot from runs' summary.json."""

from __future__ import annotations

import json

import pytest

from fellrec_flwr.eval.compare import compare


def _summary(path, method, values):
    path.mkdir(parents=True)
    per_client = {str(c): {"recall@10": v, "ndcg@10": v / 2} for c, v in enumerate(values)}
    balance = {"recall@10": {"cv": 0.5, "worst_value": min(values), "gap": max(values) - min(values)}}
    (path / "summary.json").write_text(json.dumps({
        "method": method, "per_client": per_client, "overall": {"recall@10": sum(values) / len(values)},
        "balance": balance}))


def test_compare_writes_table_with_clients_in_order_then_overall(tmp_path):
    _summary(tmp_path / "a", "fellrec", [0.3, 0.1, 0.2])
    _summary(tmp_path / "b", "fedavg", [0.2, 0.0, 0.4])
    frame = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert set(frame["method"]) == {"fellrec", "fedavg"}
    md = (tmp_path / "out" / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header.split("|")[2:6] == [" 0 ", " 1 ", " 2 ", " overall "]
    assert "| fedavg | 0.2000 | 0.0000 | 0.4000 | 0.2000 | 0.5000 | 0.0000 | 0.4000 |" in md
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 1000


def test_compare_names_a_folder_without_summary(tmp_path):
    with pytest.raises(FileNotFoundError, match="is .* a finished run folder"):
        compare([tmp_path], tmp_path / "out")


def _run_with_users(path, method, own_ranks, popularity_ranks, seed=7, users=None):
    """A run folder with summary.json, config.json and per_user.csv (own method + popularity)."""
    _summary(path, method, [0.1, 0.2])
    summary = json.loads((path / "summary.json").read_text())
    summary["split"] = "test"
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    users = users or list(range(len(own_ranks)))
    lines = ["method,round,split,client,user_id,target_rank"]
    lines += [f"{method},1,valid,0,{u},-1" for u in users]  # an older round / other split: ignored
    lines += [f"{method},3,test,{u % 2},{u},{r}" for u, r in zip(users, own_ranks)]
    lines += [f"popularity,0,test,{u % 2},{u},{r}" for u, r in zip(users, popularity_ranks)]
    (path / "per_user.csv").write_text("\n".join(lines) + "\n")


def test_compare_reports_paired_intervals_and_results_csv(tmp_path):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 200
    pop = np.where(rng.random(n) < 0.2, rng.integers(0, 20, n), -1)
    fell = np.where(rng.random(n) < 0.4, rng.integers(0, 10, n), -1)
    fedavg = np.where(rng.random(n) < 0.3, rng.integers(0, 10, n), -1)
    _run_with_users(tmp_path / "a", "fellrec", fell, pop)
    _run_with_users(tmp_path / "b", "fedavg", fedavg, pop)
    compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out", profile="cpu")
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(results.columns) == ["method", "profile", "seed", "metric", "value", "ci_low", "ci_high", "n_users"]
    assert set(results["method"]) == {"fellrec", "fedavg", "popularity"}
    assert (results["n_users"] == n).all() and (results["profile"] == "cpu").all() and (results["seed"] == 7).all()

    def row(method, metric):
        return results[(results["method"] == method) & (results["metric"] == metric)].iloc[0]

    direct = np.mean((fell >= 0) & (fell < 10))
    assert row("fellrec", "recall@10")["value"] == pytest.approx(direct)
    diff = direct - np.mean((pop >= 0) & (pop < 10))
    r = row("fellrec", "recall@10 - popularity")
    assert r["value"] == pytest.approx(diff) and r["ci_low"] < diff < r["ci_high"]
    ndcg = np.where((fedavg >= 0) & (fedavg < 20), 1 / np.log2(np.maximum(fedavg, 0) + 2), 0).mean()
    assert row("fedavg", "ndcg@20")["value"] == pytest.approx(ndcg)
    assert "fedavg - fedavg" not in " ".join(results["metric"])
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert f"Paired bootstrap, {n} test users" in md


def test_compare_keeps_only_users_every_method_evaluated_and_says_so(tmp_path):
    _run_with_users(tmp_path / "a", "fellrec", [0, -1, 3, 5], [1, 1, 1, 1], users=[1, 2, 3, 4])
    _run_with_users(tmp_path / "b", "fedavg", [0, 0, 0], [1, 1, 1], users=[2, 3, 4])
    compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    import pandas as pd

    results = pd.read_csv(tmp_path / "out" / "results.csv")
    assert (results["n_users"] == 3).all()
    assert "fellrec: 4 users, 1 of them not evaluated by every method" in (tmp_path / "out" / "comparison.md").read_text()
