"""CLI: python -m data_prep --dataset demo|games|amazon2018|table [--path DIR] [--out DIR] ...

Flags mirror the fields of ``DataSettings`` (``--num-clients`` = ``data.num-clients``);
``--out`` is ``--prepared-dir``. Prints where the folder is and its counts per client.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from data_prep.errors import DataPrepError
from data_prep.prepare import DATASETS, prepare
from data_prep.readers import TableColumns
from fellrec_flwr.config import PARTITIONERS, DataSettings
from fellrec_flwr.prepared import PreparedData, PreparedDataError

HELP = {
    "dataset": "which source to read",
    "path": "folder with the source files (games: *.item + *.test.inter; amazon2018: *.csv + meta_*.json.gz; "
            "table: interactions.csv|parquet + items.csv|parquet)",
    "prepared_dir": "output folder (alias --out); default: <cache-root>/<dataset>-<hash of settings>",
    "partitioner": "how users are split into clients",
    "train_samples": "few-shot training prompts in total (0 = all)",
    "valid_users": "validation users sampled (0 = all)",
    "test_users": "test users sampled (0 = all)",
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(DataSettings):
        flags = [f"--{f.name.replace('_', '-')}"] + (["--out"] if f.name == "prepared_dir" else [])
        choices = {"dataset": DATASETS, "partitioner": PARTITIONERS}.get(f.name)
        ap.add_argument(*flags, dest=f.name, type=type(f.default), default=f.default, choices=choices,
                        help=HELP.get(f.name, f"data.{f.name.replace('_', '-')}"))
    ap.add_argument("--seed", type=int, default=2024, help="the run's seed (sampling, BPR, K-means, shuffles)")
    ap.add_argument("--cache-root", default="prepared", help="parent of settings-keyed folders when --out is not given")
    cols = TableColumns()
    ap.add_argument("--user-col", default=cols.user, help="table: user column")
    ap.add_argument("--item-col", default=cols.item, help="table: item column (both tables)")
    ap.add_argument("--time-col", default=cols.timestamp, help="table: timestamp column (optional in the file)")
    ap.add_argument("--title-col", default=cols.title, help="table: title column of the item table")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def summary(data: PreparedData, seconds: float) -> str:
    m = data.manifest
    c = m["counts"]
    lines = [f"prepared data: {data.path}",
             f"  {m['num_items']} items, {m['num_users']} users, {m['num_interactions']} interactions, "
             f"{m['available_train_prompts']} training prompts available",
             f"  dropped: {m['dropped']}",
             f"  {'':18}{'total':>8}  per client (0..{data.num_clients - 1})"]
    for key in ("train", "valid", "test", "users", "train_interactions"):
        lines.append(f"  {key:18}{c[key]['total']:>8}  {c[key]['per_client']}")
    lines.append(f"  prep time {m['prep_seconds']} s when built; this call {seconds:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = DataSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataSettings)})
    columns = TableColumns(args.user_col, args.item_col, args.time_col, args.title_col)
    started = time.perf_counter()
    try:
        folder = prepare(settings, args.cache_root, args.seed, columns=columns, progress=not args.quiet)
        data = PreparedData.load(folder)
    except (DataPrepError, PreparedDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(data, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
