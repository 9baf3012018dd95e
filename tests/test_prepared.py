"""PreparedData: reading a prepared folder, and clear errors for broken ones."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from data_prep.prepare import prepare
from fellrec_flwr.config import DataSettings
from fellrec_flwr.data.prepared import Example, PreparedData, PreparedDataError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    settings = DataSettings(partitioner="iid", num_clients=3, train_samples=60, valid_users=30, test_users=0)
    return prepare(settings, tmp_path_factory.mktemp("cache"), seed=5, progress=False)


@pytest.fixture
def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_load_and_read(folder):
    data = PreparedData.load(folder)
    assert data.num_clients == 3 and data.num_items == len(data.items) == len(data.titles)
    assert data.titles[0] == data.items.loc[0, "title"]
    train = data.split("train")
    assert len(train) == 60 and all(isinstance(e, Example) for e in train)
    assert all(isinstance(e.history, tuple) and all(isinstance(i, int) for i in e.history) for e in train)
    frame = pd.read_parquet(folder / "train.parquet")
    assert train[0] == Example(int(frame.user_id[0]), tuple(int(i) for i in frame.history[0]), int(frame.target[0]))
    per_client = [data.split("test", client=c) for c in range(3)]
    assert sum(map(len, per_client)) == len(data.split("test")) == 800  # test_users=0: every user
    assert {e.user_id for e in per_client[1]} == set(data.train_sequences.query("client == 1").user_id)
    seqs = data.sequences(client=2)
    assert len(seqs) == data.manifest["counts"]["users"]["per_client"][2]
    u = next(iter(seqs))
    test_row = next(e for e in per_client[2] if e.user_id == u)
    assert test_row.history[-2:-1] == seqs[u][-1:]  # test history = training sequence + valid target
    with pytest.raises(PreparedDataError, match="client=3 is out of range"):
        data.split("train", client=3)
    with pytest.raises(PreparedDataError, match="Unknown split 'dev'"):
        data.split("dev")


def test_missing_and_incomplete(tmp_path, copy):
    with pytest.raises(PreparedDataError, match="not a folder"):
        PreparedData.load(tmp_path / "nowhere")
    (copy / "manifest.json").unlink()
    with pytest.raises(PreparedDataError, match="did not finish.*python -m data_prep"):
        PreparedData.load(copy)


def test_corrupt_files(copy):
    (copy / "valid.parquet").write_bytes(b"garbage")
    with pytest.raises(PreparedDataError, match="valid.parquet does not match its checksum"):
        PreparedData.load(copy)
    PreparedData.load(copy, verify=False)  # opt-out still opens it
    (copy / "valid.parquet").unlink()
    with pytest.raises(PreparedDataError, match="valid.parquet is missing"):
        PreparedData.load(copy)


def test_bad_manifest(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text("{ not json")
    with pytest.raises(PreparedDataError, match="unreadable"):
        PreparedData.load(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(PreparedDataError, match="format version 99"):
        PreparedData.load(copy)
    del manifest["num_items"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PreparedDataError, match="num_items"):
        PreparedData.load(copy)


def test_original_ids_map_back_on_a_hand_made_folder(copy):
    # rewrite the id maps by hand: user u -> "U<u>", item i -> "I<i>"
    data = PreparedData.load(copy)
    users = pd.read_parquet(copy / "users.parquet")
    assert len(users) == data.manifest["num_users"] and users["user_id"].is_unique
    data = PreparedData(copy, data.manifest)
    data._frames["users"] = users.assign(original_id=[f"U{u}" for u in users["user_id"]])
    data._frames["items"] = data.items.assign(original_id=[f"I{i}" for i in data.items["item_id"]])
    frame = pd.DataFrame({"user_id": [3, 1], "history": [[0, 2], [5]], "target": [7, 0]})
    out = data.with_original_ids(frame)
    assert out["original_user_id"].tolist() == ["U3", "U1"]
    assert out["original_history"].tolist() == [["I0", "I2"], ["I5"]]
    assert out["original_target"].tolist() == ["I7", "I0"]
    assert "original_user_id" not in frame  # a copy, the input is untouched
    with pytest.raises(PreparedDataError, match="user_id=999999 is not an id of the prepared data"):
        data.with_original_ids(pd.DataFrame({"user_id": [999999]}))


def test_demo_ids_are_their_own_originals(folder):
    data = PreparedData.load(folder)
    assert all(data.original_user_ids[u] == str(u) for u in list(data.original_user_ids)[:50])
    assert all(data.original_item_ids[i] == str(i) for i in range(data.num_items))


def test_a_run_takes_the_settings_of_its_prepared_folder(folder, tmp_path):
    from fellrec_flwr.config import FellRecConfig
    from fellrec_flwr.data.prepared import with_prepared_settings

    cfg = FellRecConfig()
    assert with_prepared_settings(cfg) is cfg  # no folder named: unchanged
    missing = FellRecConfig(data=DataSettings(prepared_dir=str(tmp_path / "not-yet")))
    assert with_prepared_settings(missing) is missing  # the run will prepare it
    named = FellRecConfig(data=DataSettings(prepared_dir=str(folder), num_clients=3), min_clients=3)
    adopted = with_prepared_settings(named).data
    assert (adopted.partitioner, adopted.test_users, adopted.valid_users) == ("iid", 0, 30)
    with pytest.raises(PreparedDataError, match=r"data.partitioner: this run 'dirichlet', the folder 'iid'"):
        with_prepared_settings(FellRecConfig(data=DataSettings(prepared_dir=str(folder), num_clients=3,
                                                               partitioner="dirichlet"), min_clients=3))


def test_a_format_1_folder_is_refused_with_the_fix(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(PreparedDataError, match="format version 1; this code reads version 2. Prepare it again"):
        PreparedData.load(copy)
