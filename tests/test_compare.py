"""compare: side-by-side table, balance columns and plot from runs' summary.json."""

from __future__ import annotations

import json

import pytest

from fellrec_flwr.compare import compare


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
