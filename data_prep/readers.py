"""Readers: turn a source data set into titled items plus one ordered sequence per user.

Three sources are supported (the built-in demo lives in :mod:`data_prep.demo`):

- ``games``: the RecBole atomic files of Amazon Video Games in ``../shared/data/amazon-games``
  (``<name>.item`` + ``<name>.test.inter``; ``<name>.valid.inter`` is checked when present).
  The test file holds each user's whole sequence: test history + test target.
- ``amazon2018``: the original Amazon Review Data (2018) files: a ratings-only CSV
  (``item,user,rating,timestamp``, no header) and ``meta_*.json.gz`` (one object per line,
  JSON or the Python-literal form of the 2018 release). Processed as upstream (LLMRank):
  sort each user's interactions by time, drop repeated (user, item), drop items without a
  title, iterative k-core (``data.k-core``, 5 upstream), re-index in order of first appearance.
- ``table``: a generic interactions table (CSV or Parquet; columns user, item, time) plus an
  item-title table (item, title), in one folder as ``interactions.{csv,parquet}`` and
  ``items.{csv,parquet}`` (or the names in ``data.interactions-file`` / ``data.items-file``).
  Column names, separator, k-core and order are ``data.*`` settings.

Order of a user's interactions (``table`` and ``amazon2018``): by time; interactions of one
user with the same time are ordered by item id (as numbers when every item id is an integer,
else as text), so the split never depends on the rows' order in the file. Only
``data.order='file'`` (table) uses the file's row order instead, and the manifest says so.

Numbering (``table``): users and items are numbered in the sorted order of their own ids (same
rule), so the numbers -- which BPR-MF, K-means, the partitioners and the samplers follow --
and with them the whole prepared folder do not depend on the rows' order either: a
row-shuffled copy of a table prepares the same folder. ``amazon2018`` keeps upstream's
numbering in order of first appearance.

Every reader returns :class:`SourceData` with item ids re-indexed to ``0..n-1`` (the Games
ids already are, and are kept) and the source's own ids kept as text
(``original_users``/``original_items``). Titles are cleaned by :func:`clean_title`.

Duplicate titles: several item ids may share one title (Games: 354 titles are shared).
They stay distinct items here. Grounding ranks *titles*, so a generated title that matches
a shared title hits every id with that title; the evaluation counts a hit on any id with the
target's title.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from fellrec_flwr.config import DATA_ORDERS
from fellrec_flwr.progress import tqdm

from data_prep.errors import DataPrepError

AMAZON_CORE = 5  # upstream 5-core: users and items with >= 5 interactions
TABLE_NUMBERING = "users and items by their own ids"  # in the cache key: folders numbered otherwise are rebuilt


@dataclass(frozen=True)
class TableColumns:
    """How to read the generic ``table`` source (run config ``data.user-col`` etc.)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    title: str = "title"
    sep: str = ","  # CSV only; "tab" or "\\t" mean a tab
    order: str = "time"  # "time": by `timestamp` (required); "file": the rows' order in the file
    interactions_file: str = "interactions"  # that file in the folder, else <name>.csv / <name>.parquet
    items_file: str = "items"

    def csv_sep(self) -> str:
        return "\t" if self.sep in ("tab", "\\t", "\t") else self.sep


@dataclass
class SourceData:
    """What a reader hands to the split builder.

    items: ``item_id`` (int64, 0..n-1) and cleaned ``title``; only items that occur in a sequence.
    sequences: user id -> item ids, oldest first, no repeats.
    dropped: what the reader removed and how many (recorded in the manifest).
    """

    items: pd.DataFrame
    sequences: dict[int, list[int]]
    dropped: dict[str, int] = field(default_factory=dict)
    original_users: dict[int, str] = field(default_factory=dict)  # user id -> the source's own id
    original_items: dict[int, str] = field(default_factory=dict)  # item id -> the source's own id


_WHITESPACE = re.compile(r"\s+")


def clean_title(raw: object) -> str:
    """HTML entities unescaped, runs of whitespace collapsed to one space, ends stripped.

    Missing values (None, NaN) give "" -- callers treat "" as "no title".
    """
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        return ""
    return _WHITESPACE.sub(" ", html.unescape(str(raw))).strip()


# ----------------------------------------------------------------------------- locating files


def _one_file(folder: Path, patterns: Iterable[str], what: str, fix: str) -> Path:
    found = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    if not found:
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise DataPrepError(f"Missing file: no {what} in {folder} (it holds: {present}). {fix}")
    if len(found) > 1:
        raise DataPrepError(f"Several files could be the {what} in {folder}: "
                            f"{', '.join(p.name for p in found)}; keep one. {fix}")
    return found[0]


def _folder(path: str | Path, dataset: str) -> Path:
    if not str(path):
        raise DataPrepError(f"data.path is empty: dataset {dataset!r} needs the folder holding its files "
                            "(CLI: --path DIR).")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        tried = f"{folder.absolute()}" + ("" if folder.is_absolute() else f", relative to the working folder {Path.cwd()}")
        raise DataPrepError(f"data.path={str(path)!r} is not a folder (tried {tried}); point it at the folder "
                            f"holding the {dataset!r} files, by an absolute path.")
    return folder


def games_files(path: str | Path) -> dict[str, Path]:
    """The Games atomic files in `path`: keys ``item``, ``test`` and (when present) ``valid``."""
    folder = _folder(path, "games")
    fix = "The folder must hold one <name>.item and one <name>.test.inter (RecBole atomic files)."
    files = {"item": _one_file(folder, ["*.item"], "*.item file", fix),
             "test": _one_file(folder, ["*.test.inter"], "*.test.inter file", fix)}
    valid = sorted(folder.glob("*.valid.inter"))
    if len(valid) == 1:
        files["valid"] = valid[0]
    return files


def amazon2018_files(path: str | Path) -> dict[str, Path]:
    """The ratings CSV and the metadata file in `path`: keys ``ratings`` and ``meta``."""
    folder = _folder(path, "amazon2018")
    fix = "Put the ratings-only CSV (e.g. Video_Games.csv) and meta_<Category>.json.gz in one folder."
    return {"ratings": _one_file(folder, ["*.csv", "*.csv.gz"], "ratings CSV", fix),
            "meta": _one_file(folder, ["meta_*.json", "meta_*.json.gz"], "meta_*.json(.gz) file", fix)}


def _named_file(folder: Path, name: str, what: str, key: str) -> Path:
    """The file `name` in `folder`, else ``<name>.csv`` or ``<name>.parquet``."""
    if (folder / name).is_file():
        return folder / name
    fix = (f"Name it {name}.csv or {name}.parquet, or set data.{key} (CLI --{key}) to its file name.")
    return _one_file(folder, [f"{name}.csv", f"{name}.parquet"], f"{what} ({name}.csv or {name}.parquet)", fix)


def table_files(path: str | Path, columns: TableColumns | None = None) -> dict[str, Path]:
    """The interactions and item-title tables in `path` (``columns`` names them; default
    ``interactions.{csv,parquet}`` and ``items.{csv,parquet}``)."""
    columns = columns or TableColumns()
    folder = _folder(path, "table")
    return {"interactions": _named_file(folder, columns.interactions_file, "interactions table", "interactions-file"),
            "items": _named_file(folder, columns.items_file, "item-title table", "items-file")}


def source_files(dataset: str, path: str | Path, columns: TableColumns | None = None) -> dict[str, Path]:
    """The files a data set is read from (no parsing): used for the cache key. `columns`: the
    table source's settings (file names)."""
    if dataset == "demo":
        return {}
    if dataset == "table":
        return table_files(path, columns)
    locate = {"games": games_files, "amazon2018": amazon2018_files}.get(dataset)
    if locate is None:
        raise DataPrepError(f"data.dataset={dataset!r} is not one of demo, games, amazon2018, table.")
    return locate(path)


# ----------------------------------------------------------------------------- games (RecBole)


def _atomic_lines(path: Path, header: list[str]) -> list[list[str]]:
    """Tab-separated RecBole atomic file -> rows (header checked, without it)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataPrepError(f"{path} is empty; expected a header line {chr(9).join(header)!r} and rows.")
    got = lines[0].split("\t")
    if [h.split(":")[0] for h in got] != header:
        raise DataPrepError(f"{path}: header {lines[0]!r} does not have the columns {header}; "
                            "is this the right RecBole atomic file?")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t", len(header) - 1)
        if len(parts) != len(header):
            raise DataPrepError(f"{path}, line {number}: expected {len(header)} tab-separated fields, "
                                f"got {len(parts)}: {line[:80]!r}.")
        rows.append(parts)
    if not rows:
        raise DataPrepError(f"{path} has a header but no rows.")
    return rows


def _ints(text: str, path: Path, number: int) -> list[int]:
    try:
        return [int(x) for x in text.split()]
    except ValueError as err:
        raise DataPrepError(f"{path}, line {number}: item ids must be integers ({err}).") from None


def _read_inter(path: Path) -> dict[int, list[int]]:
    """user -> history + [target] from a RecBole ``.inter`` file."""
    seqs: dict[int, list[int]] = {}
    for number, (user, hist, target) in enumerate(
            _atomic_lines(path, ["user_id", "item_id_list", "item_id"]), start=2):
        (uid,) = _ints(user, path, number)
        tgt = _ints(target, path, number)
        if len(tgt) != 1:
            raise DataPrepError(f"{path}, line {number}: the target column must hold one item id.")
        if uid in seqs:
            raise DataPrepError(f"{path}, line {number}: user {uid} appears twice.")
        seqs[uid] = _ints(hist, path, number) + tgt
    return seqs


def read_games(path: str | Path) -> SourceData:
    """Amazon Games RecBole files. Each user's sequence = test history + test target.

    When ``*.valid.inter`` is present it must agree: valid history + valid target equals the
    end of the test history (upstream capped histories at 49 items, so for long sequences the
    valid file holds a shorter suffix).
    """
    files = games_files(path)
    raw_items = _atomic_lines(files["item"], ["item_id", "title"])
    titles: dict[int, str] = {}
    for number, (iid, title) in enumerate(raw_items, start=2):
        (item,) = _ints(iid, files["item"], number)
        titles[item] = clean_title(title)
    seqs = _read_inter(files["test"])
    if "valid" in files:
        valid = _read_inter(files["valid"])
        for user, vseq in valid.items():
            if user not in seqs:
                raise DataPrepError(f"{files['valid']}: user {user} is not in {files['test'].name}; "
                                    "the files come from different data sets.")
            test_hist = seqs[user][:-1]
            if len(vseq) > len(test_hist) or test_hist[len(test_hist) - len(vseq):] != vseq:
                raise DataPrepError(f"{files['valid']}: user {user}'s valid history + target does not match "
                                    f"the end of the test history in {files['test'].name}; the files come "
                                    "from different data sets.")
    unknown = {i for s in seqs.values() for i in s} - titles.keys()
    if unknown:
        raise DataPrepError(f"{files['test']}: {len(unknown)} item ids are missing from {files['item'].name} "
                            f"(e.g. {sorted(unknown)[:5]}); use the matching .item file.")
    return finish_source(titles, seqs, {})


# ----------------------------------------------------------------------------- amazon 2018


def _parse_meta_line(line: str, path: Path, number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        pass
    try:  # the 2018 release writes Python literals ({'asin': ...}) in some files
        obj = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataPrepError(f"{path}, line {number}: neither JSON nor a Python literal: {line[:80]!r}. "
                            "Re-download the metadata file.") from None
    if not isinstance(obj, dict):
        raise DataPrepError(f"{path}, line {number}: expected an object with 'asin' and 'title'.")
    return obj


def read_amazon_meta(path: Path) -> dict[str, str]:
    """asin -> cleaned title (items whose title is missing or empty are left out)."""
    opener = gzip.open if path.suffix == ".gz" else open
    titles: dict[str, str] = {}
    seen_line = False
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(tqdm(fh, desc=f"reading {path.name}", unit=" lines", leave=False), 1):
            if not line.strip():
                continue
            seen_line = True
            obj = _parse_meta_line(line, path, number)
            if "asin" not in obj:
                raise DataPrepError(f"{path}, line {number}: no 'asin' field; is this a meta_*.json file?")
            title = clean_title(obj.get("title"))
            if title:
                titles[str(obj["asin"])] = title
    if not seen_line:
        raise DataPrepError(f"{path} is empty; download meta_<Category>.json.gz from the Amazon 2018 page.")
    return titles


def read_amazon_ratings(path: Path) -> pd.DataFrame:
    """The ratings-only CSV (item, user, rating, timestamp; no header) as a DataFrame."""
    try:
        df = pd.read_csv(path, header=None, dtype=str, on_bad_lines="error")
    except pd.errors.EmptyDataError:
        raise DataPrepError(f"{path} is empty; expected rows item,user,rating,timestamp.") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise DataPrepError(f"Wrong columns: {path} cannot be parsed as item,user,rating,timestamp rows "
                            f"({err}). Use the ratings-only CSV of the 2018 release.") from None
    if df.shape[1] != 4:
        raise DataPrepError(f"Wrong columns: {path} has {df.shape[1]} fields per row, expected 4 "
                            "(item,user,rating,timestamp, no header); is this the ratings-only CSV?")
    df.columns = ["item", "user", "rating", "timestamp"]
    ts = pd.to_numeric(df["timestamp"], errors="coerce")
    if ts.isna().any():
        bad = int(ts.isna().idxmax()) + 1
        if bad == 1 and ts.notna().iloc[1:].all() and len(ts) > 1:
            raise DataPrepError(f"Wrong columns: {path}, line 1 looks like a header ({df.iloc[0].tolist()}); "
                                "the 2018 ratings CSV has none: delete that line.")
        raise DataPrepError(f"Wrong columns: {path}, line {bad}: the 4th column (unix timestamp) is missing or "
                            "not a number; expected item,user,rating,timestamp.")
    df["timestamp"] = ts
    if df.empty:
        raise DataPrepError(f"{path} is empty: it has no rows item,user,rating,timestamp.")
    return df[["user", "item", "timestamp"]]


def k_core(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively keep users and items with at least `k` interactions until stable (k <= 1: all)."""
    while k > 1:
        user_ok = df["user"].map(df["user"].value_counts()) >= k
        item_ok = df["item"].map(df["item"].value_counts()) >= k
        keep = user_ok & item_ok
        if keep.all():
            return df
        df = df[keep]
    return df


def _apply_k_core(df: pd.DataFrame, k: int, source: Path, dropped: dict[str, int]) -> pd.DataFrame:
    """k-core with its own error when nothing survives (the fix: a lower data.k-core)."""
    if k <= 1:
        return df
    before_rows, before_users = len(df), df["user"].nunique()
    df = k_core(df, k)
    dropped[f"interactions_below_{k}_core"] = before_rows - len(df)
    if df.empty:
        raise DataPrepError(f"Nothing left after {k}-core filtering of {source}: none of its {before_users} "
                            f"users and their items reach {k} interactions each ({before_rows} interactions "
                            "before). Lower data.k-core (CLI --k-core; 0 = off).")
    return df


def read_amazon2018(path: str | Path, k: int = AMAZON_CORE) -> SourceData:
    """The 2018 files; `k` is the k-core threshold (``data.k-core``, 5 upstream)."""
    files = amazon2018_files(path)
    titles = read_amazon_meta(files["meta"])
    if not titles:
        raise DataPrepError(f"{files['meta']}: no item has a non-empty 'title'; re-download the metadata file.")
    df = read_amazon_ratings(files["ratings"])
    dropped: dict[str, int] = {}
    df = _order_and_dedupe(df, has_time=True, dropped=dropped)
    titled = df["item"].isin(titles.keys())
    dropped["interactions_without_title"] = int((~titled).sum())
    if not titled.any():
        raise DataPrepError(f"None of the {df['item'].nunique()} rated items of {files['ratings'].name} has a title "
                            f"in {files['meta'].name}: are both files of the same category?")
    df = _apply_k_core(df[titled], k, files["ratings"], dropped)
    return _from_frame(df, titles, dropped)


# ----------------------------------------------------------------------------- generic table


def _read_frame(path: Path, sep: str = ",") -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:  # multi-character separators need pandas' python engine
            df = pd.read_csv(path, sep=sep, engine="c" if len(sep) == 1 else "python")
    except pd.errors.EmptyDataError:
        raise DataPrepError(f"{path} is empty; it needs a header row and data rows.") from None
    except (pd.errors.ParserError, OSError, ValueError) as err:
        raise DataPrepError(f"{path}: cannot read this table ({err}); is data.sep={sep!r} its separator?") from None
    if df.empty:
        raise DataPrepError(f"{path} has no rows.")
    return df


def _need_columns(df: pd.DataFrame, path: Path, wanted: dict[str, str], sep: str = ",") -> None:
    missing = {key: col for key, col in wanted.items() if col not in df.columns}
    if missing:
        names = [str(c) for c in df.columns]
        hint = ", ".join(f"data.{key}={col!r} (CLI --{key})" for key, col in missing.items())
        # One long column name holding ';' or tabs means the file uses another separator.
        joined = path.suffix != ".parquet" and any(ch in n for n in names for ch in ";\t|," if ch != sep)
        sep_hint = f" The names look joined by a separator other than data.sep={sep!r}; set data.sep." if joined else ""
        raise DataPrepError(f"{path}: missing columns; its columns are {names}. Not found: {hint}; set these "
                            f"keys to the right column names.{sep_hint}")


def _time_column(inter: pd.DataFrame, path: Path, columns: TableColumns) -> pd.Series:
    """The time column as numbers or datetimes; a clear error when it is absent or unparsable."""
    if columns.timestamp not in inter.columns:
        raise DataPrepError(
            f"{path}: no time column {columns.timestamp!r} (data.time-col); its columns are "
            f"{list(map(str, inter.columns))}. A temporal split needs the time of each interaction: set "
            "data.time-col (CLI --time-col) to the column holding it, or set data.order='file' "
            "(CLI --order file) to split by the rows' order in the file (recorded in the manifest).")
    ts = inter[columns.timestamp]
    if not (pd.api.types.is_numeric_dtype(ts) or pd.api.types.is_datetime64_any_dtype(ts)):
        ts = pd.to_datetime(ts, errors="coerce")
    if ts.isna().any():
        bad = int(ts.isna().to_numpy().argmax()) + 2  # + header line, 1-based
        raise DataPrepError(f"{path}: column {columns.timestamp!r} has missing or unparsable values (first at "
                            f"line {bad}); fix them or name another column with data.time-col (CLI --time-col).")
    return ts


def read_table(path: str | Path, columns: TableColumns = TableColumns(), k: int = 0) -> SourceData:
    """Generic interactions + titles, ordered by time (or by file rows with order='file').

    Drops (counted in the manifest): repeated (user, item) pairs after the first -- grounding
    masks history items, so a repeated target could never be recommended -- interactions whose
    item has no (non-empty) title, the k-core filter (`k`, 0 = off) and titles of items nobody
    interacted with.
    """
    if columns.order not in DATA_ORDERS:
        raise DataPrepError(f"data.order={columns.order!r} is not one of {', '.join(DATA_ORDERS)}.")
    files = table_files(path, columns)
    sep = columns.csv_sep()
    inter = _read_frame(files["interactions"], sep)
    _need_columns(inter, files["interactions"], {"user-col": columns.user, "item-col": columns.item}, sep)
    items = _read_frame(files["items"], sep)
    _need_columns(items, files["items"], {"item-col": columns.item, "title-col": columns.title}, sep)
    by_time = columns.order == "time"
    df = pd.DataFrame({"user": inter[columns.user].astype(str), "item": inter[columns.item].astype(str)})
    if by_time:
        df["timestamp"] = _time_column(inter, files["interactions"], columns).to_numpy()
    if items[columns.item].astype(str).duplicated().any():
        raise DataPrepError(f"{files['items']}: item ids repeat in column {columns.item!r}; "
                            "give each item one row.")
    titles = {str(i): clean_title(t) for i, t in zip(items[columns.item], items[columns.title])}
    titles = {i: t for i, t in titles.items() if t}
    dropped: dict[str, int] = {}
    df = _order_and_dedupe(df, has_time=by_time, dropped=dropped)
    titled = df["item"].isin(titles.keys())
    dropped["interactions_without_title"] = int((~titled).sum())
    if not titled.any():
        raise DataPrepError(f"No item of {files['interactions'].name} has a title in {files['items'].name}; "
                            "do the item id columns match (data.item-col)?")
    df = _apply_k_core(df[titled], k, files["interactions"], dropped)
    return _from_frame(df, titles, dropped, by_own_ids=True)


# ----------------------------------------------------------------------------- shared steps


def id_order(ids: pd.Series) -> pd.Series:
    """Sort key for ids given as text: numeric when every id is an integer, else the text."""
    as_num = pd.to_numeric(ids, errors="coerce")
    if as_num.notna().all() and (as_num == as_num.round()).all():
        return as_num
    return ids.astype(str)


def _order_and_dedupe(df: pd.DataFrame, has_time: bool, dropped: dict[str, int]) -> pd.DataFrame:
    """Order each user's rows by time, then item id (see the module docstring; without a time,
    the file order) and keep the first of each repeated (user, item)."""
    if has_time:
        # `first` only groups each user's rows; a user's rows go by time, ties by item id,
        # never by the rows' order in the file.
        keys = pd.DataFrame({"first": pd.factorize(df["user"])[0], "time": df["timestamp"].to_numpy(),
                             "item": id_order(df["item"]).to_numpy(), "text": df["item"].to_numpy()},
                            index=df.index)
        df = df.loc[keys.sort_values(["first", "time", "item", "text"], kind="stable").index]
    dup = df.duplicated(["user", "item"], keep="first")
    dropped["repeated_user_item"] = int(dup.sum())
    return df[~dup]


def _sorted_ids(ids: pd.Series) -> pd.Index:
    """The distinct ids in :func:`id_order` (equal numbers, e.g. "7" and "07", by their text)."""
    distinct = pd.Series(pd.unique(ids), dtype=object).astype(str)
    keys = pd.DataFrame({"key": id_order(distinct), "text": distinct})
    return pd.Index(distinct[keys.sort_values(["key", "text"]).index], dtype=object)


def _from_frame(df: pd.DataFrame, titles: dict[str, str], dropped: dict[str, int],
                by_own_ids: bool = False) -> SourceData:
    """Re-index users and items (`by_own_ids`: in the sorted order of their own ids; else in
    order of first appearance in the time-sorted frame, as upstream); build sequences."""
    df = df.copy()
    if by_own_ids:  # independent of the rows' order (module docstring)
        user_keys, item_keys = _sorted_ids(df["user"]), _sorted_ids(df["item"])
        df["uid"], df["iid"] = user_keys.get_indexer(df["user"]), item_keys.get_indexer(df["item"])
        df = df.sort_values("uid", kind="stable")  # a user's rows keep their (time) order
    else:
        df["uid"], user_keys = pd.factorize(df["user"])
        df = df.sort_values("uid", kind="stable")
        df["iid"], item_keys = pd.factorize(df["item"])
    dropped["titled_items_without_interactions"] = len(titles) - len(item_keys)
    item_titles = {int(i): titles[key] for i, key in enumerate(item_keys)}
    seqs = {int(u): g.tolist() for u, g in df.groupby("uid", sort=True)["iid"]}
    return finish_source(item_titles, seqs, dropped,
                         original_items={i: str(k) for i, k in enumerate(item_keys)},
                         original_users={u: str(k) for u, k in enumerate(user_keys)})


def finish_source(titles: dict[int, str], seqs: dict[int, list[int]], dropped: dict[str, int],
                  original_items: dict[int, str] | None = None,
                  original_users: dict[int, str] | None = None) -> SourceData:
    """Last step of every reader: keep the items that occur in a sequence (re-indexing to
    0..n-1 only when some are unused), check titles and repeats, build the items frame.

    `original_*` map the ids given here to the source's own ids (default: the ids themselves)."""
    original_items = original_items or {i: str(i) for i in titles}
    original_users = original_users or {u: str(u) for u in seqs}
    used = sorted({i for s in seqs.values() for i in s})
    empty = [i for i in used if not titles.get(i)]
    if empty:
        raise DataPrepError(f"{len(empty)} items used in sequences have an empty title (e.g. ids {empty[:5]}); "
                            "fix the item file.")
    if used != list(range(len(used))):
        remap = {old: new for new, old in enumerate(used)}
        dropped["items_without_interactions"] = len(titles) - len(used)
        titles = {remap[i]: titles[i] for i in used}
        original_items = {remap[i]: original_items[i] for i in used}
        seqs = {u: [remap[i] for i in s] for u, s in seqs.items()}
    else:
        titles = {i: titles[i] for i in used}
    for user, seq in seqs.items():
        if len(set(seq)) != len(seq):
            raise DataPrepError(f"User {user} has a repeated item in their sequence; the source must list "
                                "each (user, item) once.")
    items = pd.DataFrame({"item_id": np.arange(len(titles), dtype=np.int64),
                          "title": [titles[i] for i in range(len(titles))]})
    return SourceData(items=items, sequences=seqs, dropped=dropped,
                      original_users={u: original_users[u] for u in seqs},
                      original_items={i: original_items[i] for i in range(len(titles))})
