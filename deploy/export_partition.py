"""Export ONE client's partition of a prepared-data folder, for that client's machine only.

    python deploy/export_partition.py PREPARED_DIR CLIENT OUT_DIR

The folder data_prep writes holds every client's rows (train/valid/test examples, training
sequences, user ids): copying it to a client machine would hand each client everyone's
histories. The export keeps the catalogue (items, titles), the tokenizer, the catalogue
embeddings and the tiny base weights (all derived from item titles), and of the user data only
the rows whose `client` is CLIENT (and those users' ids). The manifest keeps the data settings
(so the ClientApp accepts the folder as `data-path`), records `partition`, and its checksums and
counts describe the exported files. The output is private (folders 0700, files 0600).

Point the SuperNode of that client at it: `DATA_PATH=OUT_DIR deploy/start_supernode.sh CLIENT N`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fellrec_flwr.atomic import atomic_dir, atomic_to_parquet, atomic_write_text  # noqa: E402
from fellrec_flwr.data.prepared import DATA_FILES, MANIFEST, PreparedData, sha256_file  # noqa: E402

# Besides the data files, what a ClientApp reads from the folder; all derived from item titles.
# Anything else is left out (named on stderr): it may hold other clients' data.
SHARED_ENTRIES = ("tokenizer-*", "catalogue", "tiny-base-*.safetensors")
PER_CLIENT = ("train.parquet", "valid.parquet", "test.parquet", "train_sequences.parquet")


class ExportError(ValueError):
    pass


def export_partition(prepared: str | Path, client: int, out: str | Path) -> Path:
    data = PreparedData.load(prepared)  # checksums verified: export only intact data
    if not 0 <= client < data.num_clients:
        raise ExportError(f"client {client} is out of range: {prepared} has {data.num_clients} clients "
                          f"(0..{data.num_clients - 1}).")
    src, out = Path(prepared), Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        frames: dict[str, pd.DataFrame] = {}
        for name in PER_CLIENT:
            frame = pd.read_parquet(src / name)
            frames[name] = frame[frame["client"] == client].reset_index(drop=True)
        mine = set(frames["train_sequences.parquet"]["user_id"])
        for name in ("train.parquet", "valid.parquet", "test.parquet"):
            mine |= set(frames[name]["user_id"])
        users = pd.read_parquet(src / "users.parquet")
        frames["users.parquet"] = users[users["user_id"].isin(mine)].reset_index(drop=True)
        frames["items.parquet"] = pd.read_parquet(src / "items.parquet")
        schema_of = _schemas()
        for name in DATA_FILES:
            atomic_to_parquet(frames[name], tmp / name, schema=schema_of.get(name))
        skipped = _copy_shared(src, tmp)
        manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
        manifest["checksums"] = {name: sha256_file(tmp / name) for name in DATA_FILES}
        manifest["partition"] = {"client": client, "of": data.num_clients, "exported_from": str(src.resolve())}
        manifest["counts"] = _counts(frames, client, data.num_clients)
        manifest["num_users"] = len(frames["users.parquet"])
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # 0600 like the rest
    for name in skipped:
        print(f"not exported: {name} (not known to be free of other clients' data; copy it by hand if needed)",
              file=sys.stderr)
    check = PreparedData.load(out)
    for name in ("train", "valid", "test"):
        if check.split(name, client) != data.split(name, client):
            raise ExportError(f"the exported {name} split of client {client} differs from the source")
    return out


def _schemas() -> dict:
    try:
        from data_prep.prepare import SCHEMAS
    except ImportError:  # data_prep not installed here: pandas' own types
        return {}
    return SCHEMAS


def _copy_shared(src: Path, dst: Path) -> list[str]:
    skipped = []
    for entry in sorted(src.iterdir()):
        if entry.name in (*DATA_FILES, MANIFEST) or entry.name.startswith("."):
            continue  # data files are written above; dot files are locks and temporaries
        if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in SHARED_ENTRIES):
            skipped.append(entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, dst / entry.name, ignore=shutil.ignore_patterns(".*"), copy_function=shutil.copy)
        else:
            shutil.copy(entry, dst / entry.name)
    for path in [dst, *dst.rglob("*")]:  # copies keep the source's mode: make them private too
        path.chmod(0o700 if path.is_dir() else 0o600)
    return skipped


def _counts(frames: dict[str, pd.DataFrame], client: int, num_clients: int) -> dict:
    def one(n: int) -> dict:
        per = [0] * num_clients
        per[client] = n
        return {"total": n, "per_client": per}

    counts = {name.removesuffix(".parquet"): one(len(frames[name])) for name in ("train.parquet", "valid.parquet",
                                                                                 "test.parquet")}
    counts["users"] = one(len(frames["users.parquet"]))
    counts["train_interactions"] = one(int(frames["train_sequences.parquet"]["items"].map(len).sum()))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export_partition.py", description=__doc__.split("\n")[0])
    p.add_argument("prepared", help="the prepared-data folder (all clients)")
    p.add_argument("client", type=int, help="the client (partition-id) to export")
    p.add_argument("out", help="the folder to write (replaced if it exists)")
    args = p.parse_args(argv)
    try:
        out = export_partition(args.prepared, args.client, args.out)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"client {args.client}'s partition written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
