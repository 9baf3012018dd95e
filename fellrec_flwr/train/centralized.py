"""Non-federated reference points, written in the same run-folder format as `flwr run`.

    python -m fellrec_flwr.train.centralized [--run-config "data.dataset='games' ..."]
    python -m fellrec_flwr.train.centralized --popularity [--run-config ...]
    python -m fellrec_flwr.train.centralized --markov [--run-config ...]
    python -m fellrec_flwr.train.centralized --sasrec [--run-config ...]

`centralized` trains one LoRA on the union of every client's training prompts, with the
same budget as a federated run (num-server-rounds x train.local-epochs passes over the
data), and evaluates it on each client's users. `--popularity` ranks the most popular
training items not in the user's history, `--markov` the items that most often followed
the user's last item (`fellrec_flwr.eval.baselines`), `--sasrec` the next items a SASRec
trained on every training sequence scores highest (`fellrec_flwr.eval.sasrec`; trained once
per prepared data set and cached there). All write metrics.csv / summary.json / plots
under <out-dir>/<run-name>/ so `python -m fellrec_flwr.eval.compare` reads them beside the
federated runs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


from fellrec_flwr.config import FellRecConfig, from_run_config, parse_overrides
from fellrec_flwr.data.prepared import with_prepared_settings
from fellrec_flwr.model.lora_state import set_lora_state
from fellrec_flwr.eval.results import (
    PER_USER_FILE, atomic_write_json, final_intervals, per_user_rows, plot_run, summarise, write_metrics_csv,
    write_per_user_csv,
)
from fellrec_flwr.runtime import derive_seed, get_runtime, prepare_data


def run_dir_for(cfg: FellRecConfig, default_name: str) -> Path:
    return Path(cfg.out_dir).expanduser().resolve() / (cfg.run_name or default_name)


def _client_rows(round_: int, client: int, split: str, metrics: dict[str, float]) -> list[dict[str, Any]]:
    return [{"round": round_, "client": client, "split": split, "metric": k, "value": float(v)} for k, v in metrics.items()]


def evaluate_per_client(cfg: FellRecConfig, rt: Any, split: str, round_: int,
                        user_rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """metrics.csv rows of every client's users; per-user ranks are appended to `user_rows`."""
    from fellrec_flwr.heads import evaluate_head

    rows: list[dict[str, Any]] = []
    for client in range(rt.data.num_clients):
        examples = rt.data.split(split, client=client)
        loss, scores, ranked = evaluate_head(cfg, rt, examples)
        if user_rows is not None:
            user_rows += per_user_rows("centralized", round_, split, client, [r["user_id"] for r in ranked],
                                       [r["target_rank"] for r in ranked], [r["target"] for r in ranked],
                                       [r["top10"] for r in ranked])
        metrics = {"eval-loss": loss, "num-examples": len(examples)}
        metrics.update({k: v for k, v in scores.items() if k.startswith(("recall@", "ndcg@"))})
        rows += _client_rows(round_, client, split, metrics)
    return rows


def run_centralized(cfg: FellRecConfig) -> Path:
    """One adapter trained on every client's data (any model.head), evaluated on each client's users.

    With eval.test-adapter='best' the adapter of the round with the lowest validation loss
    (over all validation users) is tested, as the federated runs test each client's best."""
    from fellrec_flwr.heads import train_head
    from fellrec_flwr.model.lora_state import get_lora_state

    cfg = replace(cfg, strategy="fedavg")  # strategy is irrelevant here; keep the config valid
    run_dir = run_dir_for(cfg, f"centralized-{cfg.data.dataset}")
    rt = get_runtime(cfg)
    set_lora_state(rt.model, rt.initial_lora)  # the same seeded start as every federated client
    rows: list[dict[str, Any]] = []
    user_rows: list[dict[str, Any]] = []
    best: tuple[float, int, Any] | None = None  # (valid loss, round, adapter)
    for round_ in range(1, cfg.num_server_rounds + 1):
        t0, c0 = time.time(), time.process_time()
        result = train_head(cfg, rt, None, seed=derive_seed(cfg.seed, round_, "central"))
        rows.append({"round": round_, "client": -1, "split": "train", "metric": "train-loss", "value": float(result.loss)})
        rows.append({"round": round_, "client": -1, "split": "train", "metric": "train-cpu-seconds",
                     "value": time.process_time() - c0})
        rows.append({"round": round_, "client": -1, "split": "train", "metric": "num-examples",
                     "value": float(result.num_examples)})
        print(f"[centralized] round {round_}/{cfg.num_server_rounds}: train-loss {result.loss:.4f} on "
              f"{result.num_examples} examples ({time.time() - t0:.1f}s)", flush=True)
        if cfg.eval.interval and round_ % cfg.eval.interval == 0:
            valid_rows = evaluate_per_client(cfg, rt, "valid", round_, user_rows)
            rows += valid_rows
            write_metrics_csv(run_dir / "metrics.csv", rows)
            loss = _mean_valid_loss(valid_rows)
            if best is None or loss < best[0]:
                best = (loss, round_, get_lora_state(rt.model))
    if cfg.eval.test_adapter == "best" and best is not None:
        set_lora_state(rt.model, best[2])
        print(f"[centralized] testing the adapter of round {best[1]} (lowest valid loss {best[0]:.4f})", flush=True)
    rows += evaluate_per_client(cfg, rt, cfg.eval.final_split, cfg.num_server_rounds, user_rows)
    user_rows += _baseline_user_rows(rt.data, cfg)
    return _finish(cfg, run_dir, rows, "centralized", user_rows, rt.data)


def _mean_valid_loss(rows: list[dict[str, Any]]) -> float:
    """The validation loss over all users: clients' losses weighted by their users."""
    loss = {r["client"]: r["value"] for r in rows if r["metric"] == "eval-loss"}
    users = {r["client"]: r["value"] for r in rows if r["metric"] == "num-examples"}
    total = sum(users.values())
    return sum(loss[c] * users[c] for c in loss) / total if total else float("inf")


def run_baseline(cfg: FellRecConfig, method: str = "popularity") -> Path:
    """A non-LLM baseline ("popularity", "markov" or "sasrec") in the run-folder format."""
    from fellrec_flwr.eval.baselines import BASELINES, FittedBaselines
    from fellrec_flwr.eval.metrics import ranking_metrics

    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}.")
    if method == "sasrec" and not cfg.sasrec.enabled:
        raise ValueError("--sasrec with sasrec.enabled=false: drop the override or run another baseline.")
    run_dir = run_dir_for(cfg, f"{method}-{cfg.data.dataset}")
    data = prepare_data(cfg)
    fitted = FittedBaselines.fit_prepared(data, cfg.sasrec)
    rows: list[dict[str, Any]] = []
    for split in ("valid", cfg.eval.final_split):
        for client in range(data.num_clients):
            examples = data.split(split, client=client)
            metrics = {k: v for k, v in ranking_metrics(fitted.ranks(method, examples)).items()
                       if k.startswith(("recall@", "ndcg@"))}
            metrics["num-examples"] = len(examples)
            rows += _client_rows(0 if split == "valid" else 1, client, split, metrics)
    # Per-user ranks of every baseline, so this folder alone gives a paired comparison.
    extra = {"sasrec": fitted.sasrec.summary()} if fitted.sasrec is not None else {}
    return _finish(cfg, run_dir, rows, method, _baseline_user_rows(data, cfg, fitted), data, extra)


def run_popularity(cfg: FellRecConfig) -> Path:
    return run_baseline(cfg, "popularity")


def run_markov(cfg: FellRecConfig) -> Path:
    return run_baseline(cfg, "markov")


def run_sasrec(cfg: FellRecConfig) -> Path:
    return run_baseline(cfg, "sasrec")


def _baseline_user_rows(data: Any, cfg: FellRecConfig, fitted: Any = None) -> list[dict[str, Any]]:
    from fellrec_flwr.eval.baselines import baseline_rows

    return baseline_rows(data, ["valid", cfg.eval.final_split], sasrec=cfg.sasrec, fitted=fitted)


def _finish(cfg: FellRecConfig, run_dir: Path, rows: list[dict[str, Any]], method: str,
            user_rows: list[dict[str, Any]] | None = None, data: Any = None,
            extra: dict[str, Any] | None = None) -> Path:
    """Write the run folder; with `data` (the PreparedData) per_user.csv has the source's own ids."""
    frame = write_metrics_csv(run_dir / "metrics.csv", rows)
    atomic_write_json(run_dir / "config.json", cfg.to_run_config())
    ids = (data.original_user_ids, data.original_item_ids) if data is not None else ()
    per_user = write_per_user_csv(run_dir / PER_USER_FILE, user_rows or [], *ids)
    summary = {"method": method, "run_name": run_dir.name, **summarise(frame, cfg.eval.final_split),
               "intervals": final_intervals(per_user, method, cfg.eval.final_split), **(extra or {})}
    atomic_write_json(run_dir / "summary.json", summary)
    plot_run(frame, run_dir, f"{method} ({cfg.data.dataset})", per_user)
    print(f"[{method}] wrote {run_dir}; overall: {summary['overall']}")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", "-c", action="append", default=[],
                        help="overrides in Flower's syntax, e.g. \"data.dataset='games' num-server-rounds=5\"")
    parser.add_argument("--popularity", action="store_true", help="evaluate the popularity baseline instead")
    parser.add_argument("--markov", action="store_true", help="evaluate the Markov (last item -> next) baseline instead")
    parser.add_argument("--sasrec", action="store_true",
                        help="evaluate the SASRec baseline instead (trained once per prepared data set, cached)")
    args = parser.parse_args(argv)
    chosen = [m for m in ("popularity", "markov", "sasrec") if getattr(args, m)]
    if len(chosen) > 1:
        parser.error(f"choose one baseline, not {' and '.join('--' + m for m in chosen)}.")
    overrides = parse_overrides(args.run_config)  # several -c strings: read as one (Flower's drops keys)
    # as the ServerApp does: a prepared folder's own data settings, so config.json says what was run
    cfg = with_prepared_settings(from_run_config(overrides))
    if chosen:
        run_baseline(cfg, chosen[0])
    else:
        run_centralized(cfg)


if __name__ == "__main__":
    main()
