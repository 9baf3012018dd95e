"""prepare(): output format, no-op reuse, seeds, heterogeneity, atomicity, the CLI, real Games."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from itertools import combinations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import need_games
from scipy.spatial.distance import jensenshannon

import data_prep.prepare as prep
from data_prep.__main__ import main as cli_main
from data_prep.errors import DataPrepError
from data_prep.prepare import DATA_FILES, prepare, target_folder
from fellrec_flwr.config import DataSettings
from fellrec_flwr.data.prepared import PreparedData, adopt_settings

FAST = dict(bpr_epochs=10, bpr_dim=16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="module")
def demo_kmeans(cache):
    return prepare(DataSettings(**FAST), cache, seed=11, progress=False)


@pytest.fixture(scope="module")
def demo_iid(cache):
    return prepare(DataSettings(partitioner="iid", **FAST), cache, seed=11, progress=False)


def test_output_format_and_counts(demo_kmeans):
    m = json.loads((demo_kmeans / "manifest.json").read_text())
    assert demo_kmeans.name.startswith("demo-")
    assert sorted(m["checksums"]) == sorted(DATA_FILES)
    items = pd.read_parquet(demo_kmeans / "items.parquet")
    assert items["item_id"].tolist() == list(range(m["num_items"]))
    assert items["title"].str.contains("&amp;").sum() == 0 and items["title"].str.contains("&").any()
    assert items["title"].duplicated().sum() == 4  # the demo's deliberate re-releases
    seqs = pd.read_parquet(demo_kmeans / "train_sequences.parquet").set_index("user_id")
    for name in ("train", "valid", "test"):
        schema = pq.read_schema(demo_kmeans / f"{name}.parquet")
        assert [f.name for f in schema] == ["user_id", "history", "target", "client"]
        assert pa.types.is_list(schema.field("history").type)
        assert schema.field("history").type.value_type == pa.int64() == schema.field("target").type
        frame = pd.read_parquet(demo_kmeans / f"{name}.parquet")
        assert m["counts"][name]["total"] == len(frame)
        assert m["counts"][name]["per_client"] == np.bincount(frame["client"], minlength=5).tolist()
        assert frame["history"].map(len).between(1, 10).all()
        # every row's client is its user's client
        assert (frame["client"].to_numpy() == seqs.loc[frame["user_id"], "client"].to_numpy()).all()
    assert (m["counts"]["train"]["total"], m["counts"]["valid"]["total"], m["counts"]["test"]["total"]) == \
        (1024, 250, 250)
    # valid history = end of the training sequence; test history ends with the valid target
    valid = pd.read_parquet(demo_kmeans / "valid.parquet").set_index("user_id")
    test = pd.read_parquet(demo_kmeans / "test.parquet").set_index("user_id")
    for u in valid.index.intersection(test.index)[:20]:
        assert list(valid.loc[u, "history"]) == list(seqs.loc[u, "items"])[-10:]
        assert list(test.loc[u, "history"])[-1] == valid.loc[u, "target"]
    assert m["settings"]["seed"] == 11 and m["settings"]["bpr_epochs"] == 10


def test_second_prepare_is_a_noop(demo_kmeans, cache):
    before = (demo_kmeans / "manifest.json").stat().st_mtime_ns
    started = time.perf_counter()
    again = prepare(DataSettings(**FAST), cache, seed=11, progress=False)
    assert again == demo_kmeans and time.perf_counter() - started < 2.0
    assert (demo_kmeans / "manifest.json").stat().st_mtime_ns == before
    assert target_folder(DataSettings(**FAST), cache, seed=12) != demo_kmeans  # the seed is in the key


def test_same_seed_same_clients(demo_kmeans, tmp_path):
    out = prepare(DataSettings(prepared_dir=str(tmp_path / "again"), **FAST), "unused", seed=11, progress=False)
    for name in ("train_sequences", "train", "test"):
        assert pd.read_parquet(out / f"{name}.parquet").equals(pd.read_parquet(demo_kmeans / f"{name}.parquet"))


def mean_pairwise_js(folder, num_items: int) -> float:
    """Mean pairwise Jensen-Shannon divergence of the clients' item-frequency distributions."""
    seqs = pd.read_parquet(folder / "train_sequences.parquet")
    dists = []
    for _, group in seqs.groupby("client"):
        counts = np.bincount(np.concatenate(group["items"].to_numpy()), minlength=num_items).astype(float)
        dists.append(counts / counts.sum())
    return float(np.mean([jensenshannon(p, q, base=2) ** 2 for p, q in combinations(dists, 2)]))


def test_kmeans_clients_differ_more_than_iid(demo_kmeans, demo_iid):
    num_items = json.loads((demo_kmeans / "manifest.json").read_text())["num_items"]
    js_kmeans, js_iid = mean_pairwise_js(demo_kmeans, num_items), mean_pairwise_js(demo_iid, num_items)
    assert js_kmeans > 2 * js_iid, (js_kmeans, js_iid)


def test_too_small_samples_name_the_fix(cache):
    with pytest.raises(DataPrepError, match="raise data.valid-users"):
        prepare(DataSettings(partitioner="iid", valid_users=3, **FAST), cache, progress=False)


def test_failure_leaves_no_partial_folder(tmp_path, monkeypatch):
    real = prep.atomic_to_parquet

    def fail_on_test(frame, path, schema=None):
        if path.name == "test.parquet":
            raise OSError("disk full (simulated)")
        return real(frame, path, schema=schema)

    monkeypatch.setattr(prep, "atomic_to_parquet", fail_on_test)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        prepare(DataSettings(partitioner="iid", prepared_dir=str(out)), tmp_path, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_explicit_folder_with_other_data_is_refused(demo_iid, tmp_path):
    settings = DataSettings(partitioner="iid", prepared_dir=str(tmp_path / "p"), **FAST)
    prepare(settings, "unused", seed=11, progress=False)
    with pytest.raises(DataPrepError, match=r"prepared with other settings: data.num-clients: this run 4, the folder 5"):
        prepare(dataclasses.replace(settings, num_clients=4), "unused", seed=11, progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataPrepError, match="holds no prepared data"):
        prepare(dataclasses.replace(settings, prepared_dir=str(foreign)), "unused", progress=False)
    # a damaged folder (no manifest), even with caches the runtime put inside, is rebuilt
    (tmp_path / "p" / "manifest.json").unlink()
    (tmp_path / "p" / "catalogue").mkdir()
    prepare(settings, "unused", seed=11, progress=False)
    assert PreparedData.load(tmp_path / "p").num_clients == 5


def test_bad_settings():
    with pytest.raises(DataPrepError, match="data.dataset='movies'"):
        prepare(DataSettings(dataset="movies"), "unused")
    with pytest.raises(DataPrepError, match="data.path is empty"):
        prepare(DataSettings(dataset="games"), "unused")


def test_cli_prints_counts(tmp_path, capsys):
    rc = cli_main(["--partitioner", "iid", "--num-clients", "3", "--out", str(tmp_path / "cli"), "--quiet",
                   "--train-samples", "100", "--valid-users", "30", "--test-users", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "train                  100" in out and "users                  800" in out
    assert cli_main(["--dataset", "games", "--quiet"]) == 2
    assert "data.path is empty" in capsys.readouterr().err


@pytest.mark.shared
def test_real_games(tmp_path):
    games = need_games()
    settings = DataSettings(dataset="games", path=str(games), bpr_epochs=2, bpr_dim=16)
    data = PreparedData.load(prepare(settings, tmp_path, progress=False))
    m = data.manifest
    assert (m["num_items"], m["num_users"], m["num_interactions"]) == (16859, 50546, 440264)
    assert m["available_train_prompts"] == 440264 - 3 * 50546
    assert len(data.split("train")) == 1024 and len(data.split("test")) == 250
    assert all(n > 0 for n in m["counts"]["test"]["per_client"])
    assert data.titles[0] == "Fire Emblem: The Sacred Stones"
    assert sum(m["counts"]["users"]["per_client"]) == 50546


def test_table_source_through_cli_with_short_users(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rows = [(f"u{u}", f"i{(u + k) % 9}", 100 * u + k) for u in range(12) for k in range(5)]
    rows += [("short", "i1", 1), ("short", "i2", 2)]
    pd.DataFrame(rows, columns=["who", "what", "t"]).to_csv(src / "interactions.csv", index=False)
    pd.DataFrame({"what": [f"i{i}" for i in range(9)], "title": [f"Game {i}" for i in range(9)]}).to_csv(
        src / "items.csv", index=False)
    out = tmp_path / "out"
    rc = cli_main(["--dataset", "table", "--path", str(src), "--out", str(out), "--partitioner", "iid",
                   "--num-clients", "2", "--train-samples", "0", "--valid-users", "0", "--test-users", "0",
                   "--user-col", "who", "--item-col", "what", "--time-col", "t", "--k-core", "0", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"data.prepared-dir='{out.resolve()}'" in printed and "time: column 't'" in printed
    data = PreparedData.load(out)
    assert data.manifest["dropped"]["users_below_3_items"] == 1
    assert data.manifest["settings"]["user_col"] == "who" and data.manifest["settings"]["k_core"] == 0
    assert data.manifest["split_order"] == "time: column 't'; equal times by item id"
    assert len(data.split("train")) == 12 * 2 and len(data.split("test")) == 12
    # the source's own ids come back for every prepared id
    test = data.with_original_ids(data.split_frame("test"))
    assert set(test["original_user_id"]) == {f"u{u}" for u in range(12)}
    for u, target in zip(test["original_user_id"], test["original_target"]):
        assert target == f"i{(int(u[1:]) + 4) % 9}"  # each user's last (latest) item


def small_table(folder, user="who", item="what", time="ts", users=12):
    """`users` users with 6 items each, written newest first (the file order is not the time order)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"u{u}", f"i{(u + k) % 9}", 1000 * u + k) for u in range(users) for k in reversed(range(6))]
    pd.DataFrame(rows, columns=[user, item, time]).to_csv(folder / "interactions.csv", index=False)
    pd.DataFrame({item: [f"i{i}" for i in range(9)], "title": [f"Game {i}" for i in range(9)]}).to_csv(
        folder / "items.csv", index=False)
    return folder


TABLE = dict(dataset="table", user_col="who", item_col="what", time_col="ts", partitioner="iid", num_clients=2,
             train_samples=0, valid_users=0, test_users=0)


def test_cli_folder_is_reused_by_a_run_that_names_only_the_folder(tmp_path, capsys, monkeypatch):
    src = small_table(tmp_path / "src")
    out = tmp_path / "prepared"
    assert cli_main(["--dataset", "table", "--path", str(src), "--out", str(out), "--partitioner", "iid",
                     "--num-clients", "2", "--user-col", "who", "--item-col", "what", "--time-col", "ts",
                     "--quiet"]) == 0
    before = (out / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(prep, "build", lambda *a, **k: pytest.fail("a compatible folder was prepared again"))
    # data settings left at their defaults come from the folder; the run's seed does not matter
    run = DataSettings(prepared_dir=str(out), num_clients=2)
    adopted, notes = adopt_settings(run, json.loads((out / "manifest.json").read_text()))
    assert (adopted.dataset, adopted.user_col, adopted.path) == ("table", "who", str(src.resolve()))
    assert "data.dataset='table' (from the folder)" in notes
    assert prepare(run, "unused", seed=99, progress=False) == out
    assert prepare(adopted, "unused", seed=99, progress=False) == out
    assert (out / "manifest.json").stat().st_mtime_ns == before
    # a setting the run gives another value is named, with both values
    with pytest.raises(DataPrepError, match=r"data.test-users: this run 5, the folder 250; data.time-col: this run 'when', the folder 'ts'"):
        prepare(dataclasses.replace(run, time_col="when", test_users=5), "unused", progress=False)
    with pytest.raises(DataPrepError, match=r"data.num-clients: this run 5 \(the default\), the folder 2"):
        prepare(DataSettings(prepared_dir=str(out)), "unused", progress=False)
    # a fresh copy of the same files (new modification times, same content) is the same data
    for f in src.iterdir():
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert prepare(run, "unused", progress=False) == out
    # the same size but other content: stale, said so
    text = (src / "interactions.csv").read_text()
    assert "u0," in text
    (src / "interactions.csv").write_text(text.replace("u0,", "v0,", 1))
    with pytest.raises(DataPrepError, match="out of date: interactions.csv changed since preparation .same size"):
        prepare(run, "unused", progress=False)
    # a source file changed since preparation: stale, said so
    (src / "interactions.csv").write_text((src / "interactions.csv").read_text() + "u0,i8,99999\n")
    with pytest.raises(DataPrepError, match="out of date: interactions.csv changed since preparation"):
        prepare(run, "unused", progress=False)


def test_cli_default_folder_is_where_the_run_looks(tmp_path, capsys, monkeypatch):
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.runtime import prepare_data

    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    src = small_table(tmp_path / "src")
    assert cli_main(["--dataset", "table", "--path", str(src), "--partitioner", "iid", "--num-clients", "2",
                     "--user-col", "who", "--item-col", "what", "--time-col", "ts", "--quiet"]) == 0
    monkeypatch.setattr(prep, "build", lambda *a, **k: pytest.fail("prepared again"))
    cfg = from_run_config({"data.dataset": "table", "data.path": str(src), "data.partitioner": "iid",
                           "data.num-clients": 2, "min-clients": 2, "data.user-col": "who",
                           "data.item-col": "what", "data.time-col": "ts"})
    assert prepare_data(cfg).path.parent == tmp_path / "cache"


def test_file_order_is_explicit_and_recorded(tmp_path):
    src = small_table(tmp_path / "src", time="when")
    with pytest.raises(DataPrepError, match=r"no time column 'ts' \(data.time-col\); its columns are \['who', 'what', 'when'\]"):
        prepare(DataSettings(path=str(src), **TABLE), tmp_path, progress=False)
    folder = prepare(DataSettings(path=str(src), **{**TABLE, "order": "file"}), tmp_path, progress=False)
    data = PreparedData.load(folder)
    assert data.manifest["split_order"].startswith("file order: the rows of interactions.csv")
    test = data.with_original_ids(data.split_frame("test"))
    # written newest first, so in file order the test target is each user's OLDEST item
    assert all(t == f"i{int(u[1:]) % 9}" for u, t in zip(test["original_user_id"], test["original_target"]))
    with pytest.raises(DataPrepError, match="data.order='file' applies only to data.dataset='table'"):
        prepare(DataSettings(order="file"), tmp_path, progress=False)
    with pytest.raises(DataPrepError, match="data.k-core applies to the table and amazon2018"):
        prepare(DataSettings(k_core=3), tmp_path, progress=False)


def test_row_order_does_not_change_the_prepared_folder(tmp_path):
    """A row-shuffled copy of a table prepares the same folder (issue 26): the same files
    (checksums), the same users in the same clients, the same sampled prompts and users. Users
    and items are numbered by their own ids, and BPR-MF, K-means and the samplers follow
    those numbers, never the rows' order."""
    rng = np.random.default_rng(3)
    rows = []
    for u in rng.permutation(60):
        picked = rng.choice(30, size=int(rng.integers(5, 9)), replace=False)
        times = rng.integers(0, 20, size=len(picked))  # many equal times: the item id decides
        rows += [(f"c{u}", f"p{i:03d}", int(t)) for i, t in zip(picked, times)]
    table = pd.DataFrame(rows, columns=["customer", "product", "ts"])
    titles = pd.DataFrame({"product": [f"p{i:03d}" for i in range(30)], "name": [f"Game {i}" for i in range(30)]})
    prepared = {}
    for name, shuffle in (("original", None), ("shuffled", 7)):
        src = tmp_path / name
        src.mkdir()
        inter, items = (table, titles) if shuffle is None else (table.sample(frac=1.0, random_state=shuffle),
                                                                titles.sample(frac=1.0, random_state=shuffle))
        inter.to_csv(src / "interactions.csv", index=False)
        items.to_csv(src / "items.csv", index=False)
        settings = DataSettings(dataset="table", path=str(src), user_col="customer", item_col="product",
                                time_col="ts", title_col="name", k_core=0, num_clients=2, partitioner="kmeans",
                                train_samples=40, valid_users=30, test_users=30, bpr_epochs=5, bpr_dim=8)
        prepared[name] = PreparedData.load(prepare(settings, tmp_path / "cache", seed=5, progress=False))
    original, shuffled = prepared["original"], prepared["shuffled"]
    assert original.path != shuffled.path
    assert original.manifest["checksums"] == shuffled.manifest["checksums"]
    assert original.manifest["counts"] == shuffled.manifest["counts"]
    for split in ("train", "valid", "test"):  # the same rows, clients included
        pd.testing.assert_frame_equal(original.with_original_ids(original.split_frame(split)),
                                      shuffled.with_original_ids(shuffled.split_frame(split)))
    pd.testing.assert_frame_equal(original.train_sequences, shuffled.train_sequences)
    assert original.original_user_ids == shuffled.original_user_ids
    assert original.original_item_ids == shuffled.original_item_ids
