"""The one table of bench/gpu_check.sh, from what its steps left in one folder.

    python bench/gpu_check.py TABLE_DIR        # after bench/gpu_check.sh wrote TABLE_DIR

Reads: `pytest.log` (the `pytest -m gpu` run, with the split-vs-unsplit line its CUDA test prints),
and one folder per simulation (`metrics.csv` of the run, `run.log` of `python -m fellrec_flwr.run`).
Rows: one per simulation, with rounds per hour (bench/run_costs.py), the clients' largest peak and
held GPU memory (the ClientApp's `peak-gpu-mb`, `held-gpu-mb`) and the split service's peak GPU
memory (the ServerApp logs it when it hosts the service); then the pytest summary and the
split-vs-unsplit loss difference on CUDA.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_costs import run_costs  # noqa: E402

SERVICE_PEAK = re.compile(r"Split service peak GPU memory: (\d+) MB")
SPLIT_DIFF = re.compile(r"GPU-CHECK split-vs-unsplit loss difference: (\S+)")
PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*(?:in [\d.]+s.*)?=*$", re.M)


def _cell(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def simulation_row(folder: Path) -> list[str]:
    """name, status, rounds/hour, client peak MB, client held MB, service peak MB."""
    log = (folder / "run.log").read_text(errors="replace") if (folder / "run.log").exists() else ""
    status = (folder / "status").read_text().strip() if (folder / "status").exists() else "?"
    service = SERVICE_PEAK.findall(log)
    metrics = folder / "metrics.csv"
    costs: dict[str, float] = {}
    if metrics.exists():
        import pandas as pd

        try:
            costs = run_costs(pd.read_csv(metrics))
        except ValueError as err:
            status = f"{status} ({err})"
    return [folder.name, status, _cell(costs.get("rounds_per_hour"), "{:.1f}"),
            _cell(costs.get("max_client_peak_gpu_mb")), _cell(costs.get("max_client_held_gpu_mb")),
            _cell(float(service[-1]) if service else None)]


def table(out_dir: Path) -> str:
    lines = ["| run | exit | rounds/hour | client peak GPU MB | client held GPU MB | service peak GPU MB |",
             "|---|---|---|---|---|---|"]
    for folder in sorted(p for p in out_dir.iterdir() if (p / "status").exists()):  # one per simulation
        lines.append("| " + " | ".join(simulation_row(folder)) + " |")
    pytest_log = out_dir / "pytest.log"
    text = pytest_log.read_text(errors="replace") if pytest_log.exists() else ""
    summary = PYTEST_SUMMARY.findall(text)
    diff = SPLIT_DIFF.findall(text)
    lines.append(f"\npytest -m gpu: {summary[-1] if summary else 'no summary (see pytest.log)'}")
    lines.append(f"split vs unsplit on CUDA (tiny model, LoRA loss): {diff[-1] if diff else 'not measured'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python bench/gpu_check.py TABLE_DIR (the folder bench/gpu_check.sh wrote)", file=sys.stderr)
        return 2
    print(table(Path(args[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
