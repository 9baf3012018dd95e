"""CLI: ``python -m fellrec_flwr.audit --model tiny --data demo --cuts 0,1,2 --out docs/results/audit/demo``.

Writes audit.csv (one row per cut, direction and observed kind), audit.png, report.md and
settings.json under --out. With ``--curve`` it writes the wire defences' privacy-quality curve
instead (curve.csv, curve-detail.csv, curve.png, report.md, settings.json; see audit/curve.py).
With ``--item-uploads`` it audits what the item-token head's clients upload (item-uploads.csv,
report.md, settings.json; see audit/item_upload.py).
Same arguments and seed -> the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from threadpoolctl import threadpool_limits

from fellrec_flwr.audit.attacks import AuditSettings, run_audit
from fellrec_flwr.audit.data import load_audit_data
from fellrec_flwr.audit.report import markdown_table, write_results
from fellrec_flwr.audit.sequences import AuditError
from fellrec_flwr.config import ModelConfig
from fellrec_flwr.seeding import derive_seed


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 0,1,2,4)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (e.g. 0.1,0.5)")


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Limit torch and the BLAS libraries to ``n`` threads for a block (0 = leave them alone)."""
    if n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fellrec_flwr.audit", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny | Hugging Face folder/id | .gguf file (or its folder)")
    p.add_argument("--tiny-pretrain-prompts", type=int, default=ModelConfig.tiny_pretrain_prompts,
                   help="tiny model only: public warm-up prompts (0 = the random tiny model)")
    p.add_argument("--data", default="demo", choices=["games", "demo", "prepared"])
    p.add_argument("--data-path", default="", help="games: the RecBole folder (default ../shared/data/amazon-games); "
                                                   "prepared: a prepared folder")
    p.add_argument("--cuts", type=_ints, default=(0, 1, 2), help="front cuts k (0 = embedding output)")
    p.add_argument("--back-cuts", type=_ints, default=None, help="back cuts k (default: --cuts without 0)")
    p.add_argument("--direction", default="front,back", help="front, back or front,back")
    p.add_argument("--out", required=True, help="output folder, e.g. docs/results/audit/<name>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-prompts", type=int, default=200, help="attacker's synthetic prompts")
    p.add_argument("--eval-users", type=int, default=100, help="real users attacked")
    p.add_argument("--history-len", type=int, default=10)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--response-only-loss", action="store_true", help="client loss on the response only "
                                                                      "(train_on_inputs=False)")
    p.add_argument("--noise-sigmas", type=_floats, default=(), help="defence sweep, e.g. 0.1,0.3,1")
    p.add_argument("--noise-cut", type=int, default=1, help="front cut of the defence sweep")
    p.add_argument("--noise-loss-users", type=int, default=32, help="users the defence's price is measured on")
    p.add_argument("--curve", action="store_true",
                   help="the defences' privacy-quality curve (split.defence=noise at --curve-front-k with sigmas "
                        "--noise-sigmas, and deeper front cuts --curve-deeper-cuts) instead of the cut table")
    p.add_argument("--curve-front-k", type=int, default=1, help="--curve: the cut of the noise line (split.front-k)")
    p.add_argument("--curve-back-k", type=int, default=1, help="--curve: split.back-k")
    p.add_argument("--curve-deeper-cuts", type=_ints, default=(2,), help="--curve: the front-k line's cuts")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="--curve: first train the client's LoRA (its held layers) this many epochs on the prepared "
                        "train split (--data demo prepares the demo with the config defaults; or --data prepared)")
    p.add_argument("--noise-clip", type=float, default=1.0, help="--curve: split.noise-clip")
    p.add_argument("--nopeek-alphas", type=_floats, default=(),
                   help="--curve: the nopeek line (split.defence=nopeek at --curve-front-k), e.g. 0.5,2,8")
    p.add_argument("--dataset-label", default="", help="--curve: the dataset column of curve.csv (default: --data; "
                                                        "e.g. games for a prepared Games folder)")
    p.add_argument("--append", action="store_true",
                   help="--curve: merge this run's rows into the curve.csv already under --out (rows of the same "
                        "defence and strength are replaced; the strength-0 recall must be the same)")
    p.add_argument("--item-uploads", action="store_true",
                   help="audit the item head's uploads (model.head=item on --data demo with --model): which items "
                        "a client's id-table update names")
    p.add_argument("--single-users", type=int, default=20, help="--item-uploads: users audited as one-user clients")
    p.add_argument("--local-epochs", type=int, default=0,
                   help="--item-uploads: train.local-epochs of each client's training call (0 = the config's)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and BLAS (0 = their default); "
                                                          "1 is much faster on a crowded machine")
    p.add_argument("--work-dir", default=os.environ.get("FELLREC_CACHE", str(Path.home() / ".cache" / "fellrec-flwr")),
                   help="where the tiny tokenizer / converted GGUF are cached")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fellrec_flwr.model.loading import load_base_model

    if args.item_uploads:
        return _item_uploads(args, argv)
    try:
        directions = tuple(d.strip() for d in args.direction.split(",") if d.strip())
        back = args.back_cuts if args.back_cuts is not None else tuple(k for k in args.cuts if k > 0)
        noise = tuple(sorted({0.0, *args.noise_sigmas})) if args.noise_sigmas else ()
        settings = AuditSettings(front_cuts=args.cuts, back_cuts=back, directions=directions,
                                 train_prompts=args.train_prompts, history_len=args.history_len,
                                 max_length=args.max_length, batch_size=args.batch_size,
                                 train_on_inputs=not args.response_only_loss, seed=args.seed,
                                 noise_cut=args.noise_cut, noise_sigmas=noise,
                                 noise_loss_users=args.noise_loss_users)
        data, data_path = args.data, args.data_path
        if args.finetune_epochs > 0:
            if not args.curve or data not in ("demo", "prepared"):
                raise AuditError("--finetune-epochs needs --curve and --data demo or prepared (a train split).")
            if data == "demo":  # the demo as a run prepares it (config defaults), cached under --work-dir
                from fellrec_flwr.config import DataSettings, FellRecConfig
                from fellrec_flwr.data.on_demand import prepare_folder

                data_path = str(prepare_folder(DataSettings(), Path(args.work_dir), seed=FellRecConfig().seed))
            data = "prepared"
        titles, examples = load_audit_data(data, data_path, args.eval_users, args.history_len,
                                           derive_seed(args.seed, "eval-users"))
        started = time.time()
        model, tokenizer = load_base_model(ModelConfig(name=args.model, device="cpu", tiny_pretrain_prompts=args.tiny_pretrain_prompts), titles,
                                           Path(args.work_dir) / "audit")
        if args.curve:
            train = ()
            if args.finetune_epochs > 0:
                from fellrec_flwr.data.prepared import PreparedData

                train = PreparedData.load(Path(data_path)).split("train")
            return _curve(args, argv, settings, model, tokenizer, titles, examples, train, started)
        with torch.random.fork_rng(), cpu_threads(args.threads):
            df = run_audit(model, tokenizer, titles, examples, settings)
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = {**asdict(settings), "model": args.model, "data": args.data, "data_path": str(args.data_path),
              "eval_users": len(examples), "num_layers": int(model.config.num_hidden_layers),
              "seconds": round(time.time() - started, 1), "threads": args.threads or torch.get_num_threads()}
    command = "python -m fellrec_flwr.audit " + shlex.join(argv if argv is not None else sys.argv[1:])
    paths = write_results(args.out, df, record, command, f"{Path(args.model).name} on {args.data}")
    print(markdown_table(df, ["k", "direction", "observed", "noise_sigma", "token_acc", "history_item_recall",
                              "target_item_recall"]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _curve(args: argparse.Namespace, argv: list[str] | None, settings: AuditSettings, model, tokenizer, titles,
           examples, train, started: float) -> int:
    from fellrec_flwr.audit.curve import CurveSettings, run_curve
    from fellrec_flwr.audit.report import write_curve

    sigmas = tuple(s for s in args.noise_sigmas if s > 0)
    if not sigmas and not args.nopeek_alphas:
        sigmas = CurveSettings.noise_sigmas
    curve = CurveSettings(front_k=args.curve_front_k, back_k=args.curve_back_k, noise_sigmas=sigmas,
                          noise_clip=args.noise_clip, deeper_front_ks=args.curve_deeper_cuts,
                          nopeek_alphas=tuple(a for a in args.nopeek_alphas if a > 0))
    if args.append and not (Path(args.out) / "curve.csv").is_file():
        raise AuditError(f"--append: no curve.csv under {args.out} to add to; run without --append first.")
    with torch.random.fork_rng(), cpu_threads(args.threads):
        df, detail = run_curve(model, tokenizer, titles, examples, args.dataset_label or args.data, settings, curve,
                               train_examples=train, finetune_epochs=args.finetune_epochs)
    record = {**asdict(settings), **{f"curve_{k}": v for k, v in asdict(curve).items()}, "model": args.model,
              "data": args.data, "finetune_epochs": args.finetune_epochs, "eval_users": len(examples), "num_layers": int(model.config.num_hidden_layers),
              "seconds": round(time.time() - started, 1), "threads": args.threads or torch.get_num_threads()}
    command = "python -m fellrec_flwr.audit " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.append:
        from fellrec_flwr.audit.report import merge_curve

        try:
            df, detail, record, command = merge_curve(args.out, df, detail, record, command)
        except AuditError:  # keep what was computed: the run's own curve, beside the one it could not join
            write_curve(Path(args.out) / "append-rejected", df, detail, record, command,
                        f"{Path(args.model).name} on {args.data}")
            raise
    paths = write_curve(args.out, df, detail, record, command, f"{Path(args.model).name} on {args.data}")
    print(markdown_table(df, list(df.columns), digits=3))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _item_uploads(args: argparse.Namespace, argv: list[str] | None) -> int:
    import json

    from fellrec_flwr.atomic import atomic_write_text
    from fellrec_flwr.audit.item_upload import UploadAuditSettings, audit_item_uploads
    from fellrec_flwr.config import from_run_config

    if args.data != "demo":
        print("error: --item-uploads runs on --data demo (the config's demo data set and clients).", file=sys.stderr)
        return 2
    overrides = {"model.head": "item", "model.name": args.model}
    if args.local_epochs > 0:
        overrides["train.local-epochs"] = args.local_epochs
    cfg = from_run_config(overrides)
    started = time.time()
    with torch.random.fork_rng(), cpu_threads(args.threads):
        df = audit_item_uploads(cfg, UploadAuditSettings(single_users=args.single_users, seed=args.seed))
    summary = df.groupby(["score", df["users"] == 1]).agg(
        clients=("client", "size"), items=("items", "mean"), precision_at_n=("precision_at_n", "mean"),
        recall_at_2n=("recall_at_2n", "mean"), auc=("auc", "mean"), rows_moved=("rows_moved", "mean")).reset_index()
    summary = summary.rename(columns={"users": "one_user_clients"})
    record = {"model": args.model, "data": args.data, "single_users": args.single_users, "seed": args.seed,
              "local_epochs": cfg.train.local_epochs, "weight_decay": cfg.train.weight_decay,
              "item_head": vars(cfg.item_head) if hasattr(cfg.item_head, "__dict__") else str(cfg.item_head),
              "num_clients": cfg.data.num_clients, "seconds": round(time.time() - started, 1),
              "threads": args.threads or torch.get_num_threads()}
    command = "python -m fellrec_flwr.audit " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    atomic_write_text(out / "item-uploads.csv", df.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "settings.json", json.dumps(record, indent=2, default=str) + "\n")
    table = markdown_table(summary, list(summary.columns))
    atomic_write_text(out / "report.md", "\n".join([
        "# What the item head's uploads reveal: the id-table rows", "", f"Command: `{command}`", "",
        "Per client, the server ranks the rows of the id-table update and reads the top |S| as the client's "
        "items (S = the title groups in its training sequences); see docs/privacy_audit.md.", "",
        table, "", "Per client:", "", markdown_table(df, list(df.columns)), ""]))
    print(table)
    print(f"wrote {out / 'item-uploads.csv'}, {out / 'report.md'}, {out / 'settings.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
