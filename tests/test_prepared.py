"""PreparedData: reading a prepared folder, and clear errors for broken ones."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from data_prep.prepare import prepare
from fellrec_flwr.config import DataSettings
from fellrec_flwr.prepared import Example, PreparedData, PreparedDataError


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
