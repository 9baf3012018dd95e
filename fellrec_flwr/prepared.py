"""Read a prepared-data folder (written by ``python -m data_prep``; format in docs/architecture.md).

    data = PreparedData.load(folder)
    data.split("train", client=2)  # -> [Example(user_id, history, target), ...]
    data.titles[item_id]           # cleaned title

Several item ids may share one title (kept as distinct items). Grounding ranks titles, so a
generated title matching a shared title stands for all its ids: evaluation should count a hit
on any id whose title equals the target's title.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
_FIX = "Prepare it again: python -m data_prep --dataset ... --out FOLDER (or delete the folder and rerun)."


class PreparedDataError(ValueError):
    """The prepared folder is missing, incomplete, corrupt or of another format."""


@dataclass(frozen=True)
class Example:
    """One prompt: the user's history (item ids, oldest first) and the item to predict."""

    user_id: int
    history: tuple[int, ...]
    target: int


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
        expected = {"items.parquet", "train_sequences.parquet"} | {f"{s}.parquet" for s in SPLITS}
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
