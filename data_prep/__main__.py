"""CLI: python -m data_prep --dataset demo|games|amazon2018|table [--path DIR] [--out DIR] ...

Every flag is a ``data.*`` run-config key (``--num-clients`` = ``data.num-clients``,
``--user-col`` = ``data.user-col``; both come from ``DataSettings``); ``--out`` is
``--prepared-dir``. Without ``--out`` the folder goes where ``flwr run`` looks for the same
settings ($FELLREC_CACHE), so a run with these settings reuses it. Prints where the folder
is, its counts per client and the ``flwr run`` line that uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

# Light imports only: --help and argument errors must not wait for pandas/torch.
from fellrec_flwr.config import DATA_ORDERS, DATASETS, PARTITIONERS, DataSettings, FellRecConfig

HELP = {
    "dataset": "which source to read",
    "path": "folder with the source files (games: *.item + *.test.inter; amazon2018: *.csv + meta_*.json.gz; "
            "table: interactions.csv|parquet + items.csv|parquet, or --interactions-file / --items-file)",
    "prepared_dir": "output folder (alias --out); default: <cache-root>/<dataset>-<hash of settings>",
    "partitioner": "how users are split into clients",
    "train_samples": "few-shot training prompts in total (0 = all)",
    "valid_users": "validation users sampled (0 = all)",
    "test_users": "test users sampled (0 = all)",
    "user_col": "table: user column of the interactions table",
    "item_col": "table: item column (interactions and item-title tables)",
    "time_col": "table: time column (numbers or dates); required unless --order file",
    "title_col": "table: title column of the item-title table",
    "sep": "table: CSV separator ('tab' for tabs); ignored for parquet",
    "k_core": "table, amazon2018: keep users and items with >= k interactions, repeatedly (0 = off)",
    "order": "table: 'time' (by --time-col; equal times by item id) or 'file' (the rows' order, no time)",
    "interactions_file": "table: the interactions file in --path: that name, else <name>.csv or <name>.parquet",
    "items_file": "table: the item-title file in --path, found the same way",
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(DataSettings):
        flags = [f"--{f.name.replace('_', '-')}"] + (["--out"] if f.name == "prepared_dir" else [])
        choices = {"dataset": DATASETS, "partitioner": PARTITIONERS, "order": DATA_ORDERS}.get(f.name)
        ap.add_argument(*flags, dest=f.name, type=type(f.default), default=f.default, choices=choices,
                        help=f"{HELP.get(f.name, '')} [data.{f.name.replace('_', '-')}, default {f.default!r}]")
    ap.add_argument("--seed", type=int, default=FellRecConfig().seed,
                    help="the run's seed (sampling, BPR, K-means, shuffles) [seed]")
    ap.add_argument("--cache-root", default="",
                    help="parent of settings-keyed folders when --out is not given (default: $FELLREC_CACHE or "
                         "~/.cache/fellrec-flwr, where flwr run looks)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def summary(data, seconds: float) -> str:
    from fellrec_flwr.data.prepared import describe

    lines = describe(data).splitlines()
    lines.insert(-1, f"  prep time {data.manifest['prep_seconds']} s when built; this call {seconds:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from data_prep.errors import DataPrepError
    from data_prep.prepare import prepare
    from fellrec_flwr.data.prepared import PreparedData, PreparedDataError
    from fellrec_flwr.paths import cache_root

    settings = DataSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataSettings)})
    started = time.perf_counter()
    try:
        folder = prepare(settings, args.cache_root or cache_root(), args.seed, progress=not args.quiet)
        data = PreparedData.load(folder)
    except (DataPrepError, PreparedDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(data, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
