"""Your own data through the run config only (issue 16).

A small table with non-default column names and another separator goes through the same
steps as `flwr run . --run-config "..."`: Flower's own parser reads the override text,
Flower's own key check (`fuse_dicts(check_keys=True)`, what the SuperLink does) accepts it
against pyproject.toml, then the ServerApp and ClientApps run in process (no Ray). The run
must split by time (ties by item id) and write per_user.csv with the table's own user ids.
A folder prepared once by `python -m data_prep` is reused by a run that names only the
folder. (tests/test_flwr_run.py runs the real `flwr run`.)
"""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

import data_prep.prepare as prep
import server_app.app as server
from client_app.app import app as client_app
from conftest import ROOT
from data_prep.__main__ import main as data_prep_cli
from fellrec_flwr.inprocess_grid import InProcessGrid
from fellrec_flwr.data.prepared import PreparedData

# As tests/test_app_inprocess.py: a tiny model and few users, one round.
FAST = ("num-server-rounds=1 min-clients=2 eval.interval=0 eval.num-beams=2 eval.max-new-tokens=8 "
        "model.tiny-layers=2 model.tiny-vocab=800 train.batch-size=8 model.tiny-pretrain-prompts=64 "
        "data.bpr-epochs=2 data.train-samples=48")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path_factory.getbasetemp() / "fellrec-cache"))


def write_log(folder, seed: int = 0, users: int = 24, items: int = 12) -> pd.DataFrame:
    """`members` with 6-9 interactions at shuffled rows, some at equal times; ';'-separated."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        picked = rng.choice(items, size=int(rng.integers(6, 10)), replace=False)
        times = np.sort(rng.integers(1_600_000_000, 1_600_000_000 + 50, size=len(picked)))
        times[-2] = times[-1]  # the last two share a time: the item id decides
        rows += [(f"m-{1000 + 7 * u}", f"SKU{i:03d}", int(t)) for i, t in zip(picked, times)]
    log = pd.DataFrame(rows, columns=["member", "sku", "unix_time"]).sample(frac=1.0, random_state=seed)
    folder.mkdir(parents=True, exist_ok=True)
    log.to_csv(folder / "interactions.csv", sep=";", index=False)
    pd.DataFrame({"sku": [f"SKU{i:03d}" for i in range(items)],
                  "name": [f"Game {i} ({'deluxe' if i % 3 else 'classic'})" for i in range(items)]}).to_csv(
        folder / "items.csv", sep=";", index=False)
    return log


def expected_last_items(log: pd.DataFrame) -> dict[str, str]:
    """Each member's latest item, equal times broken by item id (the documented rule)."""
    ordered = log.sort_values(["member", "unix_time", "sku"])
    return ordered.groupby("member")["sku"].last().to_dict()


def flwr_run_config(text: str) -> dict:
    """What the ServerApp's context.run_config is after `flwr run . --run-config "<text>"`."""
    defaults = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    return fuse_dicts(defaults, parse_config_args([text]), check_keys=True)  # raises on an undeclared key


def run_in_process(run_config: dict, num_clients: int = 2) -> None:
    grid = InProcessGrid(client_app, num_clients, run_config)
    server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))


@pytest.mark.slow
def test_table_with_own_column_names_through_the_run_config_only(tmp_path):
    log = write_log(tmp_path / "mylog")
    prepared = tmp_path / "prepared"
    text = (f"data.dataset='table' data.path='{tmp_path / 'mylog'}' data.sep=';' data.user-col='member' "
            "data.item-col='sku' data.time-col='unix_time' data.title-col='name' data.k-core=3 "
            f"data.num-clients=2 data.partitioner='iid' data.valid-users=0 data.test-users=0 "
            f"data.prepared-dir='{prepared}' out-dir='{tmp_path / 'out'}' run-name='mine' {FAST}")
    run_in_process(flwr_run_config(text))

    data = PreparedData.load(prepared)
    assert data.manifest["split_order"] == "time: column 'unix_time'; equal times by item id"
    assert data.manifest["dropped"]["interactions_below_3_core"] == 0  # so the last items below are kept
    test = data.with_original_ids(data.split_frame("test"))
    last = expected_last_items(log)
    assert len(test) == log["member"].nunique() == len(last)
    assert dict(zip(test["original_user_id"], test["original_target"])) == last

    per_user = pd.read_csv(tmp_path / "out" / "mine" / "per_user.csv", dtype={"original_user_id": str})
    final = per_user[(per_user["split"] == "test") & (per_user["method"] == "fellrec")]
    assert set(final["original_user_id"]) == set(last)  # every test user, by the table's own id
    assert (final["original_user_id"] == final["user_id"].map(data.original_user_ids)).all()
    # and the items: each user's target and the run's top 10, by the table's own item ids
    assert dict(zip(final["original_user_id"], final["original_target_item"])) == last
    skus = set(log["sku"])  # (fewer than 10 where masking the history leaves fewer of the 12 items)
    assert final["original_top10"].map(lambda ids: 0 < len(json.loads(ids)) <= 10 and set(json.loads(ids)) <= skus).all()


def test_per_user_csv_gives_every_methods_items_by_the_tables_own_ids(tmp_path):
    """per_user.csv's original_target_item and original_top10 (issue 26), read as the README
    shows: the target is each user's last item in the raw table, and each recommended id is
    the raw table's id of the recommended item (its title in items.csv), for the run's method
    (packed as a ClientApp sends it) and every baseline alike."""
    from data_prep.prepare import prepare
    from fellrec_flwr.config import DataSettings
    from fellrec_flwr.eval.baselines import BASELINES, baseline_rows
    from fellrec_flwr.eval.results import flat_top_items, run_per_user_rows, write_per_user_csv

    log = write_log(tmp_path / "mylog")
    data = PreparedData.load(prepare(DataSettings(
        dataset="table", path=str(tmp_path / "mylog"), sep=";", user_col="member", item_col="sku",
        time_col="unix_time", title_col="name", k_core=3, num_clients=2, partitioner="iid", valid_users=0,
        test_users=0), tmp_path / "cache", progress=False))
    test = data.split("test")
    rng = np.random.default_rng(0)
    tops = [rng.permutation(data.num_items)[:10].tolist() for _ in test]  # some method's top 10s
    reply = {"round": 1, "client": 0, "split": "test", "user_ids": [ex.user_id for ex in test],
             "target_ranks": [-1] * len(test), "targets": [ex.target for ex in test], "top10": flat_top_items(tops)}
    from fellrec_flwr.config import SasrecSettings

    rows = run_per_user_rows("my-method", [reply]) + baseline_rows(data, ["test"], sasrec=SasrecSettings(max_epochs=2))
    write_per_user_csv(tmp_path / "per_user.csv", rows, data.original_user_ids, data.original_item_ids)

    # the README's three lines
    recs = pd.read_csv(tmp_path / "per_user.csv", dtype={"original_user_id": str, "original_target_item": str})
    recs["original_top10"] = recs["original_top10"].map(json.loads)

    assert set(recs["method"]) == {"my-method", *BASELINES}
    last = expected_last_items(log)
    raw_titles = pd.read_csv(tmp_path / "mylog" / "items.csv", sep=";").set_index("sku")["name"]
    for method, part in recs.groupby("method"):
        assert dict(zip(part["original_user_id"], part["original_target_item"])) == last, method
        for own, ids in zip(part["top10"].map(json.loads), part["original_top10"]):
            # (fewer than 10 where masking the history leaves fewer of this 12-item catalogue)
            assert 0 < len(ids) == len(own) <= 10 and set(ids) <= set(raw_titles.index), method
            assert [raw_titles[i] for i in ids] == [data.titles[i] for i in own], method
    mine = recs[recs["method"] == "my-method"].set_index("user_id")["top10"].map(json.loads)
    assert [mine[ex.user_id] for ex in test] == tops


@pytest.mark.slow
def test_a_row_shuffled_table_reproduces_the_run(tmp_path):
    """The same table in another row order gives the same run (issue 26): the same metrics and
    the same per-user ranks and recommendations, for the method and the baselines."""
    log = write_log(tmp_path / "original")
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    log.sample(frac=1.0, random_state=99).to_csv(shuffled / "interactions.csv", sep=";", index=False)
    (shuffled / "items.csv").write_text((tmp_path / "original" / "items.csv").read_text())
    runs = {}
    for name in ("original", "shuffled"):
        run_in_process(flwr_run_config(
            f"data.dataset='table' data.path='{tmp_path / name}' data.sep=';' data.user-col='member' "
            "data.item-col='sku' data.time-col='unix_time' data.title-col='name' data.k-core=3 data.num-clients=2 "
            f"data.valid-users=12 data.test-users=12 out-dir='{tmp_path / 'out'}' run-name='{name}' {FAST}"))
        run = tmp_path / "out" / name
        metrics = pd.read_csv(run / "metrics.csv")
        runs[name] = (metrics[~metrics["metric"].str.endswith("-seconds")].reset_index(drop=True),
                      pd.read_csv(run / "per_user.csv"))
    pd.testing.assert_frame_equal(runs["original"][0], runs["shuffled"][0])
    pd.testing.assert_frame_equal(runs["original"][1], runs["shuffled"][1])
    assert set(runs["original"][1]["method"]) == {"fellrec", "popularity", "markov", "sasrec"}


def test_an_undeclared_key_is_refused_by_flower_and_named_by_our_check(capsys):
    from fellrec_flwr.config import main as check_cli

    with pytest.raises(ValueError, match="data.user-column"):  # what the SuperLink logs; flwr run says code 15
        flwr_run_config("data.user-column='member'")
    assert check_cli(["data.user-column='member'"]) == 2
    assert "Did you mean 'data.user-col'" in capsys.readouterr().err
    assert check_cli(["data.user-col='member' data.sep=';'"]) == 0


@pytest.mark.slow
def test_folder_prepared_by_the_cli_is_reused_by_the_run(tmp_path, monkeypatch):
    write_log(tmp_path / "mylog", seed=1)
    folder = tmp_path / "prepared"
    assert data_prep_cli(["--dataset", "table", "--path", str(tmp_path / "mylog"), "--sep", ";", "--user-col",
                          "member", "--item-col", "sku", "--time-col", "unix_time", "--title-col", "name",
                          "--k-core", "3", "--num-clients", "2", "--partitioner", "iid", "--out", str(folder),
                          "--valid-users", "0", "--test-users", "0", "--train-samples", "48", "--quiet"]) == 0
    written = (folder / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(prep, "build", lambda *a, **k: pytest.fail("the run prepared the data again"))
    text = f"data.prepared-dir='{folder}' data.num-clients=2 out-dir='{tmp_path / 'out'}' run-name='reuse' {FAST}"
    run_in_process(flwr_run_config(text))
    assert (folder / "manifest.json").stat().st_mtime_ns == written
    config = json.loads((tmp_path / "out" / "reuse" / "config.json").read_text())
    # the run records the data it really used: the folder's settings, not the defaults
    assert (config["data.dataset"], config["data.user-col"], config["data.k-core"]) == ("table", "member", 3)


@pytest.mark.slow
def test_real_flwr_run_accepts_the_data_keys_and_keeps_the_ids(tmp_path):
    """The same table through a real `flwr run` (SuperLink, Ray): the data.* keys pass Flower's
    own check, the run finishes, and per_user.csv carries the table's ids."""
    import subprocess

    from flwr_procs import BIN, flower_env, free_port, kill_tree, pids_matching, run_list_json

    log = write_log(tmp_path / "mylog")
    port = free_port()
    env = flower_env(tmp_path / "flwr-home", port, FELLREC_CACHE=str(tmp_path / "cache"))
    text = (f"data.dataset='table' data.path='{tmp_path / 'mylog'}' data.sep=';' data.user-col='member' "
            "data.item-col='sku' data.time-col='unix_time' data.title-col='name' data.k-core=3 "
            "data.num-clients=2 data.partitioner='iid' data.valid-users=8 data.test-users=0 "
            f"out-dir='{tmp_path / 'out'}' run-name='real' {FAST}")
    cmd = [str(BIN / "flwr"), "run", str(ROOT), "--stream", "--run-config", text,
           "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    bad = [*cmd[:5], "data.user-column='member'", *cmd[6:]]
    try:
        # a key pyproject.toml does not declare: flwr says only "code 15"; the SuperLink's log names it
        refused = subprocess.run(bad, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert "Invalid run configuration" in refused.stdout + refused.stderr
        superlink_log = (tmp_path / "flwr-home" / "local-superlink" / "superlink.log").read_text()
        assert "Key 'data.user-column' is not present" in superlink_log
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        output = proc.stdout + proc.stderr
        runs = run_list_json(env)
        assert runs and runs[-1]["status"] == "finished:completed", f"{runs}\n{output[-4000:]}"
    finally:
        kill_tree(pids_matching(f"--port {port}"))
    per_user = pd.read_csv(tmp_path / "out" / "real" / "per_user.csv", dtype={"original_user_id": str})
    final = per_user[(per_user["split"] == "test") & (per_user["method"] == "fellrec")]
    assert set(final["original_user_id"]) == set(log["member"])
