"""Read a prepared-data folder (written by ``python -m data_prep``; format in docs/architecture.md).

    data = PreparedData.load(folder)
    data.split("train", client=2)  # -> [Example(user_id, history, target), ...]
    data.titles[item_id]           # cleaned title
    data.with_original_ids(frame)  # + the source's own user / item ids beside user_id, target, item_id

Several item ids may share one title (kept as distinct items). Grounding ranks titles, so a
generated title matching a shared title stands for all its ids: evaluation should count a hit
on any id whose title equals the target's title.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from fellrec_flwr.config import DataSettings

MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 2  # 2: users.parquet and items.original_id (the source's own ids)
DATA_FILES = ("items.parquet", "users.parquet", "train_sequences.parquet", *(f"{s}.parquet" for s in SPLITS))
_FIX = "Prepare it again: python -m data_prep --dataset ... --out FOLDER (or delete the folder and rerun)."


class PreparedDataError(ValueError):
    """The prepared folder is missing, incomplete, corrupt or of another format."""


@dataclass(frozen=True)
class Example:
    """One prompt: the user's history (item ids, oldest first) and the item to predict."""

    user_id: int
    history: tuple[int, ...]
    target: int


def _map_ids(values: pd.Series, mapping: dict[int, str], column: str, folder: Path) -> pd.Series:
    def one(v: Any) -> str:
        try:
            return mapping[int(v)]
        except KeyError:
            raise PreparedDataError(f"{column}={v} is not an id of the prepared data at {folder}; the "
                                    "results and the folder must belong together.") from None

    return values.map(lambda v: [one(x) for x in v] if hasattr(v, "__len__") and not isinstance(v, str) else one(v))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class PreparedData:
    """A verified prepared folder. Frames are read lazily; splits are cached per name."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._frames: dict[str, pd.DataFrame] = {}

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "PreparedData":
        """Open `path`; with `verify`, every file's sha256 is checked against the manifest."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise PreparedDataError(f"No prepared data at {path} (not a folder). {_FIX}")
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise PreparedDataError(f"{path} has no {MANIFEST}: the preparation did not finish. {_FIX}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            checksums = dict(manifest["checksums"])
            int(manifest["num_clients"]), int(manifest["num_items"])  # present and numeric
        except (ValueError, KeyError, TypeError) as err:
            raise PreparedDataError(f"{manifest_path} is unreadable or lacks a field ({err!r}). {_FIX}") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise PreparedDataError(f"{path} has format version {manifest.get('format_version')!r}; this code "
                                    f"reads version {FORMAT_VERSION}. {_FIX}")
        expected = set(DATA_FILES)
        if set(checksums) != expected:
            raise PreparedDataError(f"{manifest_path} lists files {sorted(checksums)}, expected {sorted(expected)}. {_FIX}")
        for name, digest in checksums.items():
            file = path / name
            if not file.exists():
                raise PreparedDataError(f"{file} is missing. {_FIX}")
            if verify and sha256_file(file) != digest:
                raise PreparedDataError(f"{file} does not match its checksum in {MANIFEST} (changed or "
                                        f"corrupt). {_FIX}")
        return cls(path, manifest)

    def _frame(self, name: str) -> pd.DataFrame:
        if name not in self._frames:
            self._frames[name] = pd.read_parquet(self.path / f"{name}.parquet")
        return self._frames[name]

    @property
    def num_clients(self) -> int:
        return int(self.manifest["num_clients"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def items(self) -> pd.DataFrame:
        """``item_id``, ``title`` (one row per item; titles may repeat)."""
        return self._frame("items")

    @cached_property
    def titles(self) -> dict[int, str]:
        return dict(zip(self.items["item_id"].tolist(), self.items["title"].tolist()))

    @cached_property
    def original_user_ids(self) -> dict[int, str]:
        """user_id -> the user's id in the source data (as text)."""
        users = self._frame("users")
        return dict(zip(users["user_id"].tolist(), users["original_id"].tolist()))

    @cached_property
    def original_item_ids(self) -> dict[int, str]:
        """item_id -> the item's id in the source data (as text)."""
        return dict(zip(self.items["item_id"].tolist(), self.items["original_id"].tolist()))

    def with_original_ids(self, frame: pd.DataFrame) -> pd.DataFrame:
        """A copy of `frame` with ``original_<col>`` beside each id column it has: ``user_id``
        (users), ``item_id``, ``target`` and ``history`` (items); list columns such as
        ``history`` map element-wise. Unknown ids raise, naming the column."""
        out = frame.copy()
        for column, mapping in (("user_id", self.original_user_ids), ("item_id", self.original_item_ids),
                                ("target", self.original_item_ids), ("history", self.original_item_ids)):
            if column in out.columns:
                out[f"original_{column}"] = _map_ids(out[column], mapping, column, self.path)
        return out

    @property
    def train_sequences(self) -> pd.DataFrame:
        """``user_id``, ``items`` (the whole training sequence, without valid/test targets), ``client``."""
        return self._frame("train_sequences")

    def _check_client(self, client: int | None) -> None:
        if client is not None and not 0 <= client < self.num_clients:
            raise PreparedDataError(f"client={client} is out of range: this data has {self.num_clients} "
                                    f"clients (0..{self.num_clients - 1}); check partition-id / data.num-clients.")

    def split_frame(self, name: str, client: int | None = None) -> pd.DataFrame:
        """The rows of one split as a DataFrame (``user_id``, ``history``, ``target``, ``client``)."""
        if name not in SPLITS:
            raise PreparedDataError(f"Unknown split {name!r}; use one of {', '.join(SPLITS)}.")
        self._check_client(client)
        frame = self._frame(name)
        return frame if client is None else frame[frame["client"] == client]

    def split(self, name: str, client: int | None = None) -> list[Example]:
        """The rows of one split (all clients, or one) as Examples, in file order."""
        frame = self.split_frame(name, client)
        return [Example(int(u), tuple(int(i) for i in h), int(t))
                for u, h, t in zip(frame["user_id"], frame["history"], frame["target"])]

    def sequences(self, client: int | None = None) -> dict[int, tuple[int, ...]]:
        """user_id -> training sequence, for all users or one client's."""
        self._check_client(client)
        frame = self.train_sequences
        if client is not None:
            frame = frame[frame["client"] == client]
        return {int(u): tuple(int(i) for i in s) for u, s in zip(frame["user_id"], frame["items"])}


def resolved_path(settings: DataSettings) -> str:
    """A data source's path as recorded in a manifest: absolute, "" for the generated demo."""
    return str(Path(settings.path).expanduser().resolve()) if settings.dataset != "demo" and settings.path else ""


def _key(name: str) -> str:
    return "data." + name.replace("_", "-")


def adopt_settings(settings: DataSettings, manifest: dict[str, Any]) -> tuple[DataSettings, list[str]]:
    """The run's data settings made to agree with a prepared folder's, or an error naming each
    setting that differs.

    A setting the run leaves at its default is taken from the folder (returned as a note);
    one the run sets to another value than the folder's is a conflict; ``data.num-clients``
    must always match (the federation has that many clients). The seed and the pipeline's
    recipe are not compared: the folder is the data.
    """
    recorded = {k: v for k, v in manifest.get("settings", {}).items() if k not in ("seed", "recipe")}
    defaults = dataclasses.asdict(DataSettings())
    run = dataclasses.asdict(settings)
    adopted: dict[str, Any] = {}
    conflicts: list[str] = []
    for name in ("dataset", *sorted(set(recorded) - {"dataset"})):  # dataset first: it decides the rest
        if name not in run or name not in recorded:
            continue
        current = resolved_path(dataclasses.replace(settings, **adopted)) if name == "path" else run[name]
        if current == recorded[name]:
            continue
        if run[name] == defaults[name] and name != "num_clients":
            adopted[name] = recorded[name]
        else:
            default = " (the default)" if run[name] == defaults[name] else ""
            conflicts.append(f"{_key(name)}: this run {run[name]!r}{default}, the folder {recorded[name]!r}")
    if conflicts:
        raise PreparedDataError(
            f"{settings.prepared_dir} was prepared with other settings: " + "; ".join(conflicts) + ". Use the "
            "folder's values (a data.* key left out takes the folder's value; data.num-clients must match, and "
            "min-clients and the number of SuperNodes with it), or set data.prepared-dir to a new folder to "
            "prepare these settings there.")
    notes = [f"{_key(k)}={v!r} (from the folder)" for k, v in adopted.items()]
    return dataclasses.replace(settings, **adopted), notes


def with_prepared_settings(cfg: Any) -> Any:
    """`cfg` (a FellRecConfig) with the data settings of its existing ``data.prepared-dir``.

    A folder prepared once (``python -m data_prep --out DIR``) is then run with only
    ``data.prepared-dir`` set: data settings left at their defaults take the folder's values,
    so the run's name, config.json and caches describe the data really used. A setting the
    run sets differently raises, naming it (see :func:`adopt_settings`). Without
    a finished folder there, `cfg` is returned unchanged (the run prepares it).
    """
    from logging import INFO, getLogger

    manifest_path = Path(cfg.data.prepared_dir).expanduser() / MANIFEST if cfg.data.prepared_dir else None
    if manifest_path is None or not manifest_path.exists():
        return cfg
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError:
        return cfg  # unfinished or damaged: prepare() rebuilds it
    data, notes = adopt_settings(cfg.data, manifest)
    if notes:
        getLogger("flwr").log(INFO, "Prepared data %s: %s", cfg.data.prepared_dir, ", ".join(notes))
    return dataclasses.replace(cfg, data=data)


def describe(data: PreparedData) -> str:
    """Counts of users, items, interactions and rows per client, the order used, what was
    dropped, and the `flwr run` line that uses the folder."""
    m = data.manifest
    c = m["counts"]
    lines = [f"prepared data: {data.path}",
             f"  {m['num_items']} items, {m['num_users']} users, {m['num_interactions']} interactions, "
             f"{m['available_train_prompts']} training prompts available",
             f"  order of each user's items: {m.get('split_order', '?')}",
             f"  dropped: {m['dropped']}",
             f"  {'':18}{'total':>8}  per client (0..{data.num_clients - 1})"]
    for key in ("train", "valid", "test", "users", "train_interactions"):
        lines.append(f"  {key:18}{c[key]['total']:>8}  {c[key]['per_client']}")
    n = data.num_clients
    lines.append(f"  run on it: flwr run . --run-config \"data.prepared-dir='{data.path.resolve()}' "
                 f"data.num-clients={n} min-clients={n}\" --federation-config \"num-supernodes={n}\"")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """python -m fellrec_flwr.data.prepared FOLDER: check a prepared folder (checksums) and show its counts."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m fellrec_flwr.data.prepared FOLDER  (checks a prepared folder and prints its counts)",
              file=sys.stderr)
        return 2
    try:
        print(describe(PreparedData.load(args[0])))
    except PreparedDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
