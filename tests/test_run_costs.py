"""bench/run_costs.py: rounds per hour and per-client costs from hand-made metric rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

_spec = importlib.util.spec_from_file_location("run_costs", Path(__file__).parents[1] / "bench" / "run_costs.py")
run_costs_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_costs_module)


def _rows(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["round", "client", "split", "metric", "value"])


def test_rounds_per_hour_and_client_costs_match_a_direct_computation():
    metrics = _rows(
        (1, -1, "server", "round-seconds", 100.0), (2, -1, "server", "round-seconds", 200.0),
        (1, 0, "train", "train-seconds", 10.0), (2, 0, "train", "train-seconds", 30.0),
        (1, 1, "train", "train-seconds", 50.0), (2, 1, "train", "train-seconds", 50.0),
        (1, 0, "train", "peak-gpu-mb", 900.0), (2, 0, "train", "peak-gpu-mb", 1100.0),
        (1, 1, "train", "peak-gpu-mb", 700.0), (2, 1, "train", "peak-gpu-mb", 800.0),
        (1, 0, "train", "train-loss", 1.0),
    )
    costs = run_costs_module.run_costs(metrics)
    assert costs["rounds"] == 2
    assert costs["rounds_per_hour"] == pytest.approx(3600 / 150)
    assert costs["mean_client_train_seconds"] == pytest.approx((20 + 50) / 2)
    assert costs["slowest_client_train_seconds"] == pytest.approx(50)
    assert costs["mean_client_peak_gpu_mb"] == pytest.approx((1100 + 800) / 2)  # each client's peak, averaged
    assert costs["max_client_peak_gpu_mb"] == pytest.approx(1100)


def test_cpu_run_has_no_gpu_columns_and_old_runs_get_a_clear_error():
    cpu = run_costs_module.run_costs(_rows((1, -1, "server", "round-seconds", 60.0)))
    assert cpu["rounds_per_hour"] == pytest.approx(60) and "max_client_peak_gpu_mb" not in cpu
    with pytest.raises(ValueError, match="round-seconds"):
        run_costs_module.run_costs(_rows((1, 0, "train", "train-loss", 1.0)))
    with pytest.raises(ValueError, match="lacks the columns"):
        run_costs_module.run_costs(pd.DataFrame({"round": [1], "loss": [0.5]}))
