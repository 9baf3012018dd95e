"""The verdict of bench/games_paper.sh: every method on a Games partition over seeds, against FedAvg.

    python bench/games_paper_report.py docs/results/games-kmeans [docs/results/games-hetero ...]

Each folder holds run folders named <method>-s<seed> (written by the app: `flwr run` or the
centralized command). Per folder this writes:

- compare-s<seed>/ : the app's own comparison of that seed's runs (fellrec_flwr.eval.compare);
- report.csv       : per method, per seed and pooled ("all"): Recall/NDCG@10/20 with paired bootstrap
                     95 % intervals, the difference to FedAvg [CI], worst-client Recall@10, the CV of
                     Recall@10 across clients, the last round's self-weight (min/mean/max) and smallest
                     warm weight (FELLRec's), rounds and the clients' training seconds;
- weights.csv      : FELLRec's self-weights and warm weights by round, per run (min/mean/max over clients);
- report.md, verdict.png (pooled Recall@10 - FedAvg with CIs; worst-client Recall@10), weights.png.

Pooled over seeds: each test user's metric is averaged over the seeds (the same users every seed), then a
paired bootstrap over users. The baselines (popularity, Markov, SASRec) do not depend on the seed: one row.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from fellrec_flwr.eval.bootstrap import mean_ci, paired_difference_ci
from fellrec_flwr.eval.compare import compare, final_split_of, load_summary
from fellrec_flwr.eval.results import BASELINE_METHODS, HEADLINE, final_ranks, metric_values, read_per_user

RUN_NAME = re.compile(r"^(?P<method>.+)-s(?P<seed>\d+)$")
REFERENCE = "fedavg"
ORDER = ("fedavg", "fellrec", "fellrec+", "fedprox", "ffa-lora", "fedsa-lora", "local", "centralized")


def find_runs(folder: Path) -> pd.DataFrame:
    """method, seed, path of every finished run folder <method>-s<seed> under `folder`."""
    rows = []
    for path in sorted(folder.iterdir()):
        match = RUN_NAME.match(path.name)
        if match and (path / "summary.json").exists():
            rows.append({"method": match["method"], "seed": int(match["seed"]), "path": path})
    if not rows:
        raise SystemExit(f"{folder} holds no finished run folder <method>-s<seed>/summary.json; run "
                         "bench/games_paper.sh first.")
    return pd.DataFrame(rows)


def user_values(run_dir: Path, method: str) -> dict[str, pd.Series]:
    """metric -> per-user values (indexed by user id) of `method`'s final evaluation in one run."""
    summary = load_summary(run_dir)
    ranks = final_ranks(read_per_user(run_dir), method, final_split_of(summary))
    return {m: pd.Series(metric_values(ranks.to_numpy(), m), index=ranks.index) for m in HEADLINE}


def weight_rows(run_dir: Path, method: str, seed: int) -> list[dict]:
    """FELLRec's per-round self-weight and warm weight (min/mean/max over clients); [] for other strategies."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    rows = []
    for name in ("self-weight", "warm-weight"):
        part = metrics[metrics["metric"] == name]
        for round_, values in part.groupby("round")["value"]:
            rows.append({"method": method, "seed": seed, "round": int(round_), "weight": name,
                         "min": values.min(), "mean": values.mean(), "max": values.max(), "clients": len(values)})
    return rows


def costs(run_dir: Path) -> dict:
    """Rounds and the clients' training seconds (one thread each; centralized: its CPU seconds)."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    train = metrics[metrics["metric"].isin(["train-seconds", "train-cpu-seconds"])]["value"].sum()
    rounds = int(metrics[metrics["split"] == "train"]["round"].max())
    wall = metrics[metrics["metric"] == "round-seconds"]["value"].sum()
    return {"rounds": rounds, "train_seconds": float(train), "round_wall_seconds": float(wall)}


def interval_cells(values: np.ndarray, reference: np.ndarray | None, metric: str) -> dict:
    mean = mean_ci(values)
    out = {metric: mean.value, f"{metric} low": mean.low, f"{metric} high": mean.high}
    if reference is not None:
        diff = paired_difference_ci(values, reference)
        out.update({f"{metric} - {REFERENCE}": diff.value, f"{metric} - {REFERENCE} low": diff.low,
                    f"{metric} - {REFERENCE} high": diff.high})
    return out


def partition_report(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = find_runs(folder)
    for seed, group in runs.groupby("seed"):
        compare(list(group["path"]), folder / f"compare-s{seed}", profile="games-paper")
    values: dict[tuple[str, int | str], dict[str, pd.Series]] = {}
    extra: dict[tuple[str, int | str], dict] = {}
    weights: list[dict] = []
    for run in runs.itertuples():
        values[(run.method, run.seed)] = user_values(run.path, run.method)
        summary = load_summary(run.path)
        balance = summary.get("balance", {}).get("recall@10", {})
        last = [w for w in weight_rows(run.path, run.method, run.seed)]
        weights += last
        final = {w["weight"]: w for w in last if w["round"] == max((x["round"] for x in last), default=0)}
        extra[(run.method, run.seed)] = {
            "worst-client recall@10": balance.get("worst_value", np.nan), "cv recall@10": balance.get("cv", np.nan),
            "clients": len(summary.get("per_client", {})),
            "self-weight min": final.get("self-weight", {}).get("min", np.nan),
            "self-weight mean": final.get("self-weight", {}).get("mean", np.nan),
            "self-weight max": final.get("self-weight", {}).get("max", np.nan),
            "warm-weight min": final.get("warm-weight", {}).get("min", np.nan), **costs(run.path)}
    first = runs.iloc[0]["path"]
    for baseline in BASELINE_METHODS:  # seed-free: from any run (the same users)
        if len(final_ranks(read_per_user(first), baseline, final_split_of(load_summary(first)))):
            values[(baseline, "all")] = user_values(first, baseline)
    # the users every run evaluated (a failed client would leave some out)
    common = sorted(set.intersection(*(set(v["recall@10"].index) for v in values.values())))
    seeds = sorted(runs["seed"].unique())
    methods = [m for m in ORDER if m in set(runs["method"])] + sorted(set(runs["method"]) - set(ORDER))
    rows = []
    for method in methods + [b for b in BASELINE_METHODS if (b, "all") in values]:
        own_seeds = [s for s in seeds if (method, s) in values]
        for seed in own_seeds + ["all"]:  # a baseline has the "all" row only
            pick = own_seeds if seed == "all" else [seed]
            pick = pick or ["all"]
            row = {"method": method, "seed": seed, "n_users": len(common)}
            for metric in HEADLINE:
                mine = np.mean([values[(method, s)][metric].loc[common].to_numpy() for s in pick], axis=0)
                ref_seeds = [s for s in pick if (REFERENCE, s) in values]
                ref = (np.mean([values[(REFERENCE, s)][metric].loc[common].to_numpy() for s in ref_seeds], axis=0)
                       if ref_seeds and method != REFERENCE and method not in BASELINE_METHODS else None)
                row.update(interval_cells(mine, ref, metric))
            per_seed = [extra[(method, s)] for s in pick if (method, s) in extra]
            if per_seed:
                row.update({k: float(np.nanmean([p[k] for p in per_seed])) if not all(np.isnan(p[k]) for p in per_seed)
                            else np.nan for k in per_seed[0]})
            rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(weights)


def markdown(report: pd.DataFrame, folder: Path) -> str:
    pooled = report[report["seed"] == "all"]
    n = int(report["n_users"].iloc[0])

    def ci(r, m, diff=False):
        key = f"{m} - {REFERENCE}" if diff else m
        if key not in r or pd.isna(r[key]):
            return ""
        fmt = "{:+.4f} [{:+.4f}, {:+.4f}]" if diff else "{:.4f} [{:.4f}, {:.4f}]"
        return fmt.format(r[key], r[f"{key} low"], r[f"{key} high"])

    lines = [f"# {folder.name}: every method over seeds ({n} test users, the same for every run)\n",
             "Pooled = each user's metric averaged over the seeds, then a paired bootstrap over users (95 % CI). "
             "Per-client columns: the mean over seeds of each run's worst client and CV of Recall@10 across "
             "clients. Weights: FELLRec's last round, mean over seeds (1/N = a plain average).\n",
             "| method | seeds | Recall@10 | − FedAvg | NDCG@10 | − FedAvg | Recall@20 | − FedAvg | NDCG@20 | "
             "worst client R@10 | CV R@10 | self-weight min/mean/max | min warm weight | rounds | train CPU-h |",
             "|" + "---|" * 15]
    for _, r in pooled.iterrows():
        seeds = sorted(report[(report["method"] == r["method"]) & (report["seed"] != "all")]["seed"].tolist())
        weights = "" if pd.isna(r.get("self-weight mean", np.nan)) else \
            f"{r['self-weight min']:.3f} / {r['self-weight mean']:.3f} / {r['self-weight max']:.3f}"
        warm = "" if pd.isna(r.get("warm-weight min", np.nan)) else f"{r['warm-weight min']:.3f}"
        worst = "" if pd.isna(r.get("worst-client recall@10", np.nan)) else f"{r['worst-client recall@10']:.4f}"
        cv = "" if pd.isna(r.get("cv recall@10", np.nan)) else f"{r['cv recall@10']:.3f}"
        rounds = "" if pd.isna(r.get("rounds", np.nan)) else f"{r['rounds']:.0f}"
        cpu = "" if pd.isna(r.get("train_seconds", np.nan)) else f"{r['train_seconds'] * len(seeds) / 3600:.2f}"
        lines.append(f"| {r['method']} | {','.join(map(str, seeds)) or '-'} | {ci(r, 'recall@10')} | "
                     f"{ci(r, 'recall@10', True)} | {ci(r, 'ndcg@10')} | {ci(r, 'ndcg@10', True)} | "
                     f"{ci(r, 'recall@20')} | {ci(r, 'recall@20', True)} | {ci(r, 'ndcg@20')} | {worst} | {cv} | "
                     f"{weights} | {warm} | {rounds} | {cpu} |")
    single = report[(report["seed"] != "all") & report["method"].isin(
        [m for m in ORDER if m != REFERENCE])]
    single = single[single["method"].isin(set(report[report["seed"] == "all"]["method"]))]
    lines += ["", "Per seed: Recall@10 − FedAvg [95 % CI] on the same users.", "",
              "| method | seed | Recall@10 | − FedAvg | worst client R@10 | CV R@10 |", "|---|---|---|---|---|---|"]
    for _, r in single.iterrows():
        lines.append(f"| {r['method']} | {r['seed']} | {ci(r, 'recall@10')} | {ci(r, 'recall@10', True)} | "
                     f"{r.get('worst-client recall@10', np.nan):.4f} | {r.get('cv recall@10', np.nan):.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: pd.DataFrame, weights: pd.DataFrame, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = report[(report["seed"] == "all") & report["method"].isin(ORDER)]
    pooled = pooled[pooled["method"] != REFERENCE]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    key = f"recall@10 - {REFERENCE}"
    if key in pooled:
        y = pooled[key].to_numpy()
        err = np.vstack([y - pooled[f"{key} low"].to_numpy(), pooled[f"{key} high"].to_numpy() - y])
        axes[0].errorbar(range(len(y)), y, yerr=err, fmt="o", capsize=4)
        axes[0].axhline(0, color="grey", lw=0.8)
        axes[0].set_xticks(range(len(y)), pooled["method"], rotation=30)
        axes[0].set_ylabel("Recall@10 − FedAvg (pooled, 95 % CI)")
    every = report[(report["seed"] == "all") & report["method"].isin(ORDER)]
    axes[1].bar(range(len(every)), every["worst-client recall@10"])
    axes[1].set_xticks(range(len(every)), every["method"], rotation=30)
    axes[1].set_ylabel("worst client's Recall@10 (mean over seeds)")
    fig.suptitle(f"{folder.name}: {int(report['n_users'].iloc[0])} test users")
    fig.tight_layout()
    fig.savefig(folder / "verdict.png", dpi=110)
    plt.close(fig)
    if weights.empty:
        return
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (method, seed), part in weights[weights["weight"] == "self-weight"].groupby(["method", "seed"]):
        ax.plot(part["round"], part["mean"], marker="o", label=f"{method} s{seed} (mean; band min-max)")
        ax.fill_between(part["round"], part["min"], part["max"], alpha=0.15)
    clients = int(weights["clients"].max())
    ax.axhline(1 / clients, color="grey", ls="--", lw=0.8, label=f"1/N = {1 / clients:.3f}")
    ax.set_xlabel("round")
    ax.set_ylabel("self-weight W_ii")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "weights.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    for folder in args.folders:
        report, weights = partition_report(folder)
        report.to_csv(folder / "report.csv", index=False)
        weights.to_csv(folder / "weights.csv", index=False)
        (folder / "report.md").write_text(markdown(report, folder))
        plot(report, weights, folder)
        print((folder / "report.md").read_text())


if __name__ == "__main__":
    main()
