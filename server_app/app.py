"""The FELLRec ServerApp: runs the configured strategy and writes the run folder.

Flow of `main`:
1. read the typed config; resume from a checkpoint when `resume-from` is set;
2. otherwise build the shared LoRA initialisation (seeded) that every client starts from;
3. optionally start the split-inference service on loopback (simulation convenience);
4. run the strategy for the remaining rounds, checkpointing after every round;
5. evaluate every client's final (personalised) LoRA on its test users, write
   summary.json, plots, and each client's adapter (peft `save_pretrained`).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fellrec_flwr.eval.balance_report import plot_balance
from fellrec_flwr.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fellrec_flwr.config import ConfigError, FellRecConfig, from_run_config, refuse_relative_paths
from fellrec_flwr.model.lora_state import record_to_state, state_to_record
from fellrec_flwr.data.prepared import with_prepared_settings
from fellrec_flwr.eval.results import (
    PER_USER_FILE, atomic_write_json, final_intervals, plot_run, run_per_user_rows, summarise, write_metrics_csv,
    write_per_user_csv,
)
from fellrec_flwr.runtime import initial_lora, model_checkpoint, prepare_data, save_adapter
from strategies import make_strategy

app = ServerApp()

# Keys that may differ between a stopped run and its resumption.
RESUMABLE_KEYS = {"num-server-rounds", "resume-from", "out-dir", "node-wait-timeout"}


def run_dir_of(cfg: FellRecConfig) -> Path:
    return Path(cfg.out_dir).expanduser().resolve() / cfg.resolved_run_name()


def check_resumable(cfg: FellRecConfig, ckpt: Checkpoint) -> None:
    now = cfg.to_run_config()
    changed = sorted(k for k, v in ckpt.config.items() if k not in RESUMABLE_KEYS and now.get(k) != v)
    if changed:
        raise ConfigError(
            f"resume-from: these settings differ from the checkpointed run: {', '.join(changed)}. "
            "Resume with the same settings (only num-server-rounds may grow), or start a new run."
        )


@contextlib.contextmanager
def split_service(cfg: FellRecConfig) -> Iterator[FellRecConfig]:
    """Start a loopback split service for this run when split is on and no URL is given."""
    if not cfg.split.enabled or cfg.split.service_url:
        yield cfg
        return
    from server_app.split_service import start_service_for_run

    handle = start_service_for_run(cfg, model_checkpoint(cfg))  # the ServerApp prepares; the service loads
    log(INFO, "Split-inference service for this run at %s", handle.url)
    try:
        yield replace(cfg, split=replace(cfg.split, service_url=handle.url))
    finally:
        handle.stop()
        if handle.service.device.type == "cuda":  # this process's GPU memory is the service's (bench/gpu_check.sh)
            import torch

            log(INFO, "Split service peak GPU memory: %.0f MB", torch.cuda.max_memory_reserved(handle.service.device)
                / 2**20)


@app.main()
def main(grid: Grid, context: Context) -> None:
    # absolute data paths only (this runs in the SuperLink's folder), then a prepared folder's own settings
    cfg = with_prepared_settings(refuse_relative_paths(from_run_config(context.run_config)))
    run_dir = run_dir_of(cfg)
    strategy = make_strategy(cfg, run_dir)
    start_round = 0
    if cfg.resume_from:
        ckpt = load_checkpoint(cfg.resume_from)
        check_resumable(cfg, ckpt)
        strategy.load_state_dict(ckpt.strategy_state)  # restores round offset and metric rows
        initial = state_to_record(ckpt.global_arrays)
        start_round = ckpt.round
        log(INFO, "Resuming %s from round %d (checkpoint %s)", cfg.resolved_run_name(), start_round, cfg.resume_from)
    else:  # the same seeded LoRA init for every client, from the model config: no weights loaded here
        initial = state_to_record(initial_lora(cfg))
    atomic_write_json(run_dir / "config.json", cfg.to_run_config())
    log(INFO, "Run folder: %s", run_dir)

    baselines, original_ids = server_side_user_data(cfg)

    def write_per_user(strat: Any) -> Any:
        return write_per_user_csv(run_dir / PER_USER_FILE, run_per_user_rows(cfg.strategy, strat.user_ranks) + baselines,
                                  *original_ids)

    def on_round_end(server_round: int, strat: Any) -> None:
        rows = strat.metric_rows()
        frame = write_metrics_csv(run_dir / "metrics.csv", rows)
        save_checkpoint(run_dir, Checkpoint(
            round=server_round, strategy_state=strat.state_dict(),
            global_arrays=record_to_state(strat.global_arrays), metric_rows=rows, config=cfg.to_run_config(),
        ))
        per_user = write_per_user(strat)
        plot_run(frame, run_dir, cfg.resolved_run_name(), per_user)
        plot_balance(frame, run_dir, cfg.resolved_run_name())  # FELLRec's client x client weights

    remaining = cfg.num_server_rounds - start_round
    with split_service(cfg) as run_cfg:
        # Clients learn the URL of a service started for this run from every message.
        split_url = {"split-url": run_cfg.split.service_url} if run_cfg.split.enabled else {}
        if remaining > 0:
            result = strategy.start(
                grid=grid, initial_arrays=initial, num_rounds=remaining,
                train_config=ConfigRecord({"seed": cfg.seed, **split_url}),
                evaluate_config=ConfigRecord({"split": "valid", **split_url}),
                on_round_end=on_round_end,
            )
            final_arrays = result.arrays if result.arrays is not None else initial
        else:
            final_arrays = initial
        last_round = start_round + max(remaining, 0)
        # eval.test-adapter: each client's best adapter by its own valid loss (authors), or the last.
        strategy.evaluate_all(grid, final_arrays, split=cfg.eval.final_split, server_round=last_round,
                              config=ConfigRecord(split_url), adapter=cfg.eval.test_adapter)
    frame = write_metrics_csv(run_dir / "metrics.csv", strategy.metric_rows())
    per_user = write_per_user(strategy)
    summary = {"method": cfg.strategy, "run_name": cfg.resolved_run_name(), "failed_clients": strategy.failed_clients(),
               **summarise(frame, cfg.eval.final_split),
               "intervals": final_intervals(per_user, cfg.strategy, cfg.eval.final_split)}
    summary["test_adapter"] = {"choice": cfg.eval.test_adapter,  # which round each client's tested adapter is from
                               "best_valid_round": {str(k): r for k, (r, _) in sorted(strategy.best.client_best.items())}}
    atomic_write_json(run_dir / "summary.json", summary)
    plot_run(frame, run_dir, cfg.resolved_run_name(), per_user)
    save_adapters(cfg, strategy, final_arrays, run_dir)
    log(INFO, "Final %s metrics (overall): %s", cfg.eval.final_split, summary["overall"])
    log(INFO, "Paired 95%% bootstrap intervals over users: %s", summary["intervals"])


def server_side_user_data(cfg: FellRecConfig) -> tuple[list[dict[str, Any]], tuple[dict[int, str] | None, ...]]:
    """per_user.csv extras the server can add when it holds the prepared data (simulation):
    popularity, Markov and SASRec rows on the run's validation and final users, and (user ids, item ids) ->
    ids in the source data. In a deployment whose data live only on the clients the run goes on
    without them: they are a convenience, never a reason to fail a run.
    """
    from fellrec_flwr.eval.baselines import baseline_rows

    try:
        data = prepare_data(cfg)
        return (baseline_rows(data, ["valid", cfg.eval.final_split], sasrec=cfg.sasrec),
                (data.original_user_ids, data.original_item_ids))
    except Exception as err:  # noqa: BLE001 -- see the docstring
        log(WARNING, "No popularity/Markov/SASRec baselines or original user and item ids in this run folder: %s", err)
        return [], (None, None)


def save_adapters(cfg: FellRecConfig, strategy: Any, global_arrays: ArrayRecord, run_dir: Path) -> None:
    """Each client's tested LoRA (eval.test-adapter: best or last) as a peft adapter folder
    (PeftModel.from_pretrained loads it)."""
    for key in strategy.client_keys():
        tested = strategy.best_personal_arrays(key) if cfg.eval.test_adapter == "best" else strategy.personal_arrays(key)
        arrays = tested or global_arrays
        save_adapter(cfg, record_to_state(arrays), run_dir / "adapters" / f"client-{key}")  # no base model needed
