"""prepare(settings, cache_root) -> the prepared-data folder (format: docs/architecture.md).

Steps: read the source -> drop users with < 3 items -> leave-one-out + few-shot samples ->
users to clients (BPR + K-means, IID or Dirichlet) -> write the folder atomically.
The source's own user and item ids are kept (``users.parquet``, ``items.parquet``
``original_id``) so results can be joined back to the user's system.

The folder is ``settings.prepared_dir`` or, when that is "", ``<cache_root>/<dataset>-<key>``
where the key hashes everything that determines the content (the data settings, the seed,
the table's column names, the fixed recipe constants) and the source files' names, sizes and
modification times. A folder whose manifest matches is reused as is (a no-op), so every
ClientApp can call ``prepare`` and only the first one does the work; a file lock serialises
concurrent callers on one machine.

An explicit folder (``data.prepared-dir``, e.g. written once by ``python -m data_prep --out``)
is reused when its settings are compatible with the run's (:func:`adopt_settings`): every data
setting the run leaves at its default is taken from the folder; one the run sets differently,
and ``data.num-clients`` always, must match, or the error names each differing setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from data_prep import bpr, kmeans, partitioners, readers, splits
from data_prep.demo import DEMO_VERSION, read_demo
from data_prep.errors import DataPrepError
from data_prep.readers import SourceData, TableColumns
from fellrec_flwr.atomic import atomic_dir, atomic_to_parquet, atomic_write_json
from fellrec_flwr.config import DATA_ORDERS, DATASETS, PARTITIONERS, DataSettings
from fellrec_flwr.data.prepared import (FORMAT_VERSION, MANIFEST, PreparedData, PreparedDataError, adopt_settings,
                                        resolved_path, sha256_file)

CREATED_BY = f"fellrec-flwr data_prep (format {FORMAT_VERSION})"

_LIST = pa.list_(pa.int64())
SCHEMAS = {
    "items.parquet": pa.schema([("item_id", pa.int64()), ("title", pa.string()), ("original_id", pa.string())]),
    "users.parquet": pa.schema([("user_id", pa.int64()), ("original_id", pa.string())]),
    "train.parquet": pa.schema([("user_id", pa.int64()), ("history", _LIST), ("target", pa.int64()),
                                ("client", pa.int64())]),
    "train_sequences.parquet": pa.schema([("user_id", pa.int64()), ("items", _LIST), ("client", pa.int64())]),
}
SCHEMAS["valid.parquet"] = SCHEMAS["test.parquet"] = SCHEMAS["train.parquet"]
DATA_FILES = tuple(SCHEMAS)


# ----------------------------------------------------------------------------- identity of a folder


def recipe() -> dict[str, Any]:
    """Constants of the pipeline that are not settings but shape the output."""
    return {
        "format_version": FORMAT_VERSION,
        "min_sequence": splits.MIN_SEQUENCE,
        "amazon_core": readers.AMAZON_CORE,
        "bpr": dataclasses.asdict(bpr.BprRecipe()),
        "kmeans_n_init": kmeans.KMEANS_N_INIT,
        "dirichlet_categories": partitioners.DIRICHLET_CATEGORIES,
        "dirichlet_min_share": partitioners.DIRICHLET_MIN_SHARE,
        "demo_version": DEMO_VERSION,
    }


# Settings that only some sources (or partitioners) read: left out of the others' identity
# and manifest, so changing one that has no effect neither rebuilds nor conflicts.
TABLE_ONLY = ("user_col", "item_col", "time_col", "title_col", "sep", "order", "interactions_file", "items_file")
USES_K_CORE = ("table", "amazon2018")


def table_columns(settings: DataSettings) -> TableColumns:
    return TableColumns(settings.user_col, settings.item_col, settings.time_col, settings.title_col,
                        settings.sep, settings.order, settings.interactions_file, settings.items_file)


def data_settings_dict(settings: DataSettings) -> dict[str, Any]:
    """The data settings that shape this source's content (path resolved, unused keys out)."""
    out = dataclasses.asdict(settings)
    out.pop("prepared_dir")  # where it is written, not what
    out["path"] = resolved_path(settings)
    if settings.dataset != "table":
        for key in TABLE_ONLY:
            out.pop(key)
    if settings.dataset not in USES_K_CORE:
        out.pop("k_core")
    if settings.partitioner == "iid":  # no BPR embeddings, no Dirichlet draw
        for key in ("bpr_dim", "bpr_epochs", "dirichlet_alpha"):
            out.pop(key)
    elif settings.partitioner == "kmeans":
        out.pop("dirichlet_alpha")
    return out


def content_settings(settings: DataSettings, seed: int) -> dict[str, Any]:
    """Everything that determines the folder's content (recorded as ``manifest.settings``)."""
    out = data_settings_dict(settings)
    out["seed"] = int(seed)
    out["recipe"] = recipe()
    if settings.dataset == "table":  # how ids are numbered shapes the clients and samples (readers docstring)
        out["recipe"]["table_numbering"] = readers.TABLE_NUMBERING
    return out


def split_order(settings: DataSettings, files: dict[str, Path]) -> str:
    """How each user's sequence was ordered (recorded in the manifest, said by the CLI)."""
    if settings.dataset == "demo":
        return "generated in order (built-in demo)"
    if settings.dataset == "games":
        return f"as listed in {files['test'].name} (time order, by the upstream release)"
    if settings.dataset == "table" and settings.order == "file":
        return f"file order: the rows of {files['interactions'].name} as written (data.order='file'; no time used)"
    column = settings.time_col if settings.dataset == "table" else "timestamp"
    return f"time: column {column!r}; equal times by item id"


def source_fingerprint(settings: DataSettings, content: bool = False) -> list[dict[str, Any]]:
    """Name, size and mtime of each source file (cheap; no parsing); with `content` also its sha256
    (recorded once, at preparation: a copy with new modification times is then recognised)."""
    files = readers.source_files(settings.dataset, settings.path, table_columns(settings))
    return [{"role": role, "name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns,
             **({"sha256": sha256_file(p)} if content else {})} for role, p in sorted(files.items())]


def _same_file(recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    """Name, size and mtime agree (the sha256, recorded at preparation only, is not compared here)."""
    return all(recorded.get(k) == now.get(k) for k in ("role", "name", "size", "mtime_ns"))


def cache_key(content: dict[str, Any], fingerprint: list[dict[str, Any]]) -> str:
    blob = json.dumps({"settings": content, "source": fingerprint}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest if the folder is complete and intact (checksums verified), else None."""
    try:
        return PreparedData.load(folder).manifest
    except PreparedDataError:
        return None


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ----------------------------------------------------------------------------- the pipeline


def validate(settings: DataSettings) -> None:
    if settings.dataset not in DATASETS:
        raise DataPrepError(f"data.dataset={settings.dataset!r} is not one of {', '.join(DATASETS)}.")
    if settings.order not in DATA_ORDERS:
        raise DataPrepError(f"data.order={settings.order!r} is not one of {', '.join(DATA_ORDERS)}.")
    if settings.order == "file" and settings.dataset != "table":
        raise DataPrepError(f"data.order='file' applies only to data.dataset='table' ({settings.dataset!r} "
                            "has its own order); remove it.")
    if settings.k_core < 0:
        raise DataPrepError(f"data.k-core={settings.k_core} must be >= 0 (0 = no filtering).")
    default_k = DataSettings().k_core
    if settings.k_core != default_k and settings.dataset not in USES_K_CORE:
        raise DataPrepError(f"data.k-core applies to the table and amazon2018 sources; {settings.dataset!r} "
                            f"comes filtered. Leave data.k-core at {default_k}.")
    if settings.partitioner not in PARTITIONERS:
        raise DataPrepError(f"data.partitioner={settings.partitioner!r} is not one of {', '.join(PARTITIONERS)}.")
    for name in ("num_clients", "history_len", "bpr_dim"):
        if getattr(settings, name) < 1:
            raise DataPrepError(f"data.{name.replace('_', '-')}={getattr(settings, name)} must be >= 1.")
    if settings.partitioner != "iid" and settings.bpr_epochs < 1:
        raise DataPrepError(f"data.bpr-epochs={settings.bpr_epochs} must be >= 1 for the "
                            f"{settings.partitioner} partitioner (it clusters BPR embeddings).")


def read_source(settings: DataSettings) -> SourceData:
    if settings.dataset == "demo":
        return read_demo()
    if settings.dataset == "games":
        return readers.read_games(settings.path)
    if settings.dataset == "amazon2018":
        return readers.read_amazon2018(settings.path, settings.k_core)
    return readers.read_table(settings.path, table_columns(settings), settings.k_core)


def assign_users(sequences: list[list[int]], user_ids: list[int], num_items: int, settings: DataSettings,
                 seed: int, progress: bool) -> dict[int, int]:
    """user_id -> client id with the chosen partitioner (BPR on the training sequences first,
    unless IID)."""
    if len(user_ids) < settings.num_clients:
        raise DataPrepError(f"{len(user_ids)} users cannot form {settings.num_clients} clients; lower "
                            "data.num-clients.")
    # Columns a partitioner does not use stay constant (IID needs neither; K-means no categories).
    embeddings = np.zeros((len(user_ids), 1), dtype=np.float32)
    categories = np.zeros(len(user_ids), dtype=np.int64)
    if settings.partitioner != "iid":
        result = bpr.train_bpr(sequences, num_items, settings.bpr_dim, settings.bpr_epochs, seed, progress=progress)
        embeddings = result.user_embeddings
        if settings.partitioner == "dirichlet":
            item_groups = partitioners.item_categories(result.item_embeddings, seed)
            categories = partitioners.dominant_category(sequences, item_groups)
    partitioner = partitioners.make_partitioner(settings.partitioner, settings.num_clients, seed,
                                                settings.dirichlet_alpha, len(user_ids))
    users = partitioners.user_dataset(user_ids, embeddings, categories)
    try:
        return partitioners.assign_clients(partitioner, users)
    except DataPrepError:
        raise
    except ValueError as err:  # flwr-datasets' own checks (e.g. Dirichlet redraws exhausted)
        raise DataPrepError(f"The {settings.partitioner} partitioner failed: {err} Try a larger "
                            "data.dirichlet-alpha or fewer data.num-clients.") from None


def _counts(frame: pd.DataFrame, num_clients: int, weight: pd.Series | None = None) -> dict[str, Any]:
    values = weight if weight is not None else pd.Series(1, index=frame.index)
    per_client = values.groupby(frame["client"]).sum().reindex(range(num_clients), fill_value=0)
    return {"total": int(values.sum()), "per_client": [int(x) for x in per_client]}


def _check_every_client_has_rows(frames: dict[str, pd.DataFrame], num_clients: int) -> None:
    for name, knob in (("train", "train-samples"), ("valid", "valid-users"), ("test", "test-users")):
        present = set(frames[name]["client"].tolist())
        empty = [c for c in range(num_clients) if c not in present]
        if empty:
            raise DataPrepError(f"Client(s) {empty} have no {name} rows after sampling "
                                f"{len(frames[name])} rows over {num_clients} clients; raise data.{knob} "
                                "(0 = all) or lower data.num-clients.")


def build(settings: DataSettings, seed: int, progress: bool = True) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Compute every output frame and the manifest's counts (no writing)."""
    source = read_source(settings)
    sequences, short = splits.drop_short_users(source.sequences)
    dropped = dict(source.dropped)
    dropped[f"users_below_{splits.MIN_SEQUENCE}_items"] = short
    if not sequences:
        raise DataPrepError(f"No user has {splits.MIN_SEQUENCE} or more interactions; nothing to split.")
    parts = splits.build_splits(sequences, settings.history_len, settings.train_samples,
                                settings.valid_users, settings.test_users, seed)
    seq_frame = parts.train_sequences
    client_of = assign_users(seq_frame["items"].tolist(), seq_frame["user_id"].tolist(), len(source.items),
                             settings, seed, progress)
    items = source.items.assign(original_id=[source.original_items[i] for i in source.items["item_id"]])
    users = pd.DataFrame({"user_id": seq_frame["user_id"],
                          "original_id": [source.original_users[u] for u in seq_frame["user_id"]]})
    frames = {"items.parquet": items, "users.parquet": users}
    for name, frame in (("train", parts.train), ("valid", parts.valid), ("test", parts.test),
                        ("train_sequences", seq_frame)):
        frames[f"{name}.parquet"] = frame.assign(client=frame["user_id"].map(client_of).astype("int64"))
    by_split = {n.removesuffix(".parquet"): f for n, f in frames.items()}
    _check_every_client_has_rows(by_split, settings.num_clients)
    n = settings.num_clients
    ts = by_split["train_sequences"]
    info = {
        "num_clients": n,
        "num_items": len(source.items),
        "num_users": len(seq_frame),
        "num_interactions": int(sum(len(s) for s in sequences.values())),
        "available_train_prompts": parts.available_train_prompts,
        "counts": {
            "train": _counts(by_split["train"], n),
            "valid": _counts(by_split["valid"], n),
            "test": _counts(by_split["test"], n),
            "users": _counts(ts, n),
            "train_interactions": _counts(ts, n, ts["items"].map(len)),
        },
        "dropped": dropped,
    }
    return frames, info


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """An exclusive lock beside `folder` (POSIX); concurrent prepares wait, then reuse."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic renames still keep the folder consistent
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stale_source(settings: DataSettings, manifest: dict[str, Any]) -> str:
    """Which recorded source file changed since preparation ("" if none, or if the sources are
    not reachable here: a prepared folder may travel without them)."""
    try:
        now = {f["role"]: f for f in source_fingerprint(settings)}
    except DataPrepError:
        return ""
    files = None
    for old in manifest.get("source", []):
        new = now.get(old["role"])
        if new is None or _same_file(old, new):
            continue
        if old.get("sha256") and new["size"] == old["size"] and new["name"] == old["name"]:
            # only the modification time moved (a fresh copy or checkout): the content decides
            files = files or readers.source_files(settings.dataset, settings.path, table_columns(settings))
            if sha256_file(files[old["role"]]) == old["sha256"]:
                continue
            return f"{new['name']} changed since preparation (same size, other content)"
        return (f"{new['name']} changed since preparation (size {old['size']} -> {new['size']} bytes, or its "
                "modification time)")
    return ""


def _reusable(folder: Path, settings: DataSettings, content: dict[str, Any], explicit: bool) -> bool:
    """True if `folder` already holds this data (explicit folders: compatible data, see
    :func:`adopt_settings`); raises if an explicit folder holds other data or foreign files."""
    if not folder.exists():
        return False
    manifest = read_manifest(folder)
    if manifest is not None:
        if not explicit:  # a settings-keyed cache folder: exactly these settings and sources
            recorded, now = manifest.get("source", []), source_fingerprint(settings)
            return (manifest.get("settings") == content and len(recorded) == len(now)
                    and all(_same_file(a, b) for a, b in zip(recorded, now)))
        try:
            effective, _notes = adopt_settings(settings, manifest)
        except PreparedDataError as err:  # raised by the library, where runs adopt a folder's settings too
            raise DataPrepError(str(err)) from None
        stale = _stale_source(effective, manifest)
        if stale:
            raise DataPrepError(f"{folder} is out of date: {stale}. Prepare again (delete the folder and rerun), "
                                "or set data.prepared-dir to a new folder.")
        return True
    # A folder with some of our files is a damaged prepared folder (perhaps with caches the
    # runtime keeps inside it): rebuilt. A non-empty folder without any is someone else's.
    entries = [p.name for p in folder.iterdir()]
    if entries and not set(entries) & {*DATA_FILES, MANIFEST}:
        raise DataPrepError(f"{folder} exists and holds no prepared data ({entries[:5]}); choose an empty "
                            "or new folder for data.prepared-dir.")
    return False


def target_folder(settings: DataSettings, cache_root: str | Path, seed: int = 2024) -> Path:
    """Where prepare() writes for these settings (without preparing)."""
    if settings.prepared_dir:
        return Path(settings.prepared_dir).expanduser()
    key = cache_key(content_settings(settings, seed), source_fingerprint(settings))
    return Path(cache_root).expanduser() / f"{settings.dataset}-{key}"


def prepare(settings: DataSettings, cache_root: str | Path, seed: int = 2024, *, progress: bool = True) -> Path:
    """Prepare the data set described by `settings` (a no-op if already done); return its folder.

    `seed` is the run's seed (``FellRecConfig.seed``): it drives the few-shot sampling, BPR,
    K-means and the IID/Dirichlet shuffles. A compatible explicit folder is reused as is.
    """
    validate(settings)
    explicit = bool(settings.prepared_dir)
    content = content_settings(settings, seed)
    folder = target_folder(settings, cache_root, seed)  # an explicit folder needs no source files
    if _reusable(folder, settings, content, explicit):
        return folder
    with _lock(folder):
        if _reusable(folder, settings, content, explicit):  # another process finished meanwhile
            return folder
        started = time.perf_counter()
        files = readers.source_files(settings.dataset, settings.path, table_columns(settings))
        fingerprint = source_fingerprint(settings, content=True)  # before reading: a later change shows as stale
        frames, info = build(settings, seed, progress)
        with atomic_dir(folder, overwrite=True) as tmp:
            for name, frame in frames.items():
                atomic_to_parquet(frame, tmp / name, schema=SCHEMAS[name])
            manifest = {
                "format_version": FORMAT_VERSION,
                "created_by": CREATED_BY,
                "dataset": settings.dataset,
                "split_order": split_order(settings, files),
                "settings": content,
                "source": fingerprint,
                **info,
                "checksums": {name: sha256_file(tmp / name) for name in DATA_FILES},
                "prep_seconds": round(time.perf_counter() - started, 2),
            }
            atomic_write_json(tmp / MANIFEST, manifest)  # last: its presence marks a complete folder
    return folder
