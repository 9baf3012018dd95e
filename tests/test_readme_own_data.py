"""README "Your own data": every example in the section is run, every quoted error is real.

- The ```csv blocks are the heads of the two files: a generated table with those headers and
  those rows (plus more users) is written to `mydata/` in a scratch folder.
- Every command of the ```bash block runs there, in order, as written (bash expands `$PWD`).
  `python -m ...` lines run as they are. A `flwr` executable placed first on PATH records
  the arguments each `flwr run` line gets from the shell. The test then does what `flwr run`
  does with them: Flower's own parser reads `--run-config`, Flower's key check validates it
  against pyproject.toml, and the ServerApp runs with as many in-process ClientApps as
  `num-supernodes`. Only model/eval/train speed keys are added, so the data settings are the
  README's. The real `flwr run` path has its own test (tests/test_flwr_run.py).
- The ```python block reads the run's per_user.csv; its ids are checked against the table.
- Each message quoted under "Common errors" is produced by the code (triggered here).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from conftest import ROOT

SPEED = ("num-server-rounds=1 eval.interval=0 eval.num-beams=2 eval.max-new-tokens=8 model.tiny-layers=2 "
         "model.tiny-vocab=800 train.batch-size=8 model.tiny-pretrain-prompts=64")


def section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Your own data\n")
    end = readme.index("\n## ", start + 5)
    return readme[start:end]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", section(), flags=re.S)


def commands() -> list[str]:
    (block,) = blocks("bash")
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def write_mydata(folder: Path) -> None:
    """The README's rows, then 40 more customers with 6-9 purchases each (some at equal times)."""
    inter_head, items_head = (pd.read_csv(pd.io.common.StringIO(b)) for b in blocks("csv"))
    rng = np.random.default_rng(0)
    titles = dict(zip(items_head["product"], items_head["name"]))
    titles.update({f"p{i:03d}": f"Game number {i}" for i in range(100, 118)})
    rows = [tuple(r) for r in inter_head.itertuples(index=False)]
    for c in range(40):
        picks = rng.choice(sorted(titles), size=int(rng.integers(6, 10)), replace=False)
        times = np.sort(rng.integers(1_714_000_000, 1_714_100_000, size=len(picks)))
        times[0] = times[1]
        rows += [(f"c{100 + c}", p, int(t)) for p, t in zip(picks, times)]
    folder.mkdir()
    pd.DataFrame(rows, columns=list(inter_head.columns)).sample(frac=1.0, random_state=1).to_csv(
        folder / "interactions.csv", index=False)
    pd.DataFrame({"product": list(titles), "name": list(titles.values())}).to_csv(folder / "items.csv", index=False)


def fake_flwr(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir()
    script = bin_dir / "flwr"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    script.chmod(0o755)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def run_like_flwr(argv: list[str]) -> None:
    """`flwr run . --run-config X --federation-config Y`, with the ServerApp and ClientApps in process."""
    import server_app.app as server
    from client_app.app import app as client_app
    from fellrec_flwr.inprocess_grid import InProcessGrid

    assert argv[:2] == ["run", "."], argv
    defaults = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    overrides = parse_config_args([option(argv, "--run-config")])
    run_config = fuse_dicts(defaults, {**overrides, **parse_config_args([SPEED])}, check_keys=True)
    supernodes = int(parse_config_args([option(argv, "--federation-config")])["num-supernodes"])
    grid = InProcessGrid(client_app, supernodes, run_config)
    server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))


@pytest.mark.slow
def test_every_command_of_the_section_runs(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    write_mydata(work / "mydata")
    record = tmp_path / "flwr-calls.jsonl"
    fake_flwr(tmp_path / "bin", record)
    monkeypatch.chdir(work)  # the ServerApp writes its run folder under out-dir (relative: here)
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for command in commands():
        assert shlex.split(command)[0] in ("python", "flwr"), command
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
        if shlex.split(command)[0] == "flwr":
            run_like_flwr(json.loads(record.read_text().splitlines()[-1]))
            summary = json.loads((work / "results" / "fellrec-table" / "summary.json").read_text())
            assert set(summary["per_client"]) == {"0", "1"}
            per_user = pd.read_csv(work / "results" / "fellrec-table" / "per_user.csv")
            assert per_user["original_user_id"].str.fullmatch(r"c\d+").all()  # the table's own ids
    # the section's Python lines read the last run's recommendations by the table's own ids
    (code,) = blocks("python")
    scope: dict = {}
    exec(code, scope)
    final = scope["recs"][scope["recs"]["split"] == "test"]
    assert set(final["method"]) == {"fellrec", "popularity", "markov", "sasrec"}
    raw = pd.read_csv(work / "mydata" / "interactions.csv")
    last = raw.sort_values(["customer", "ts", "product"]).groupby("customer")["product"].last()
    assert (final["original_target_item"] == final["original_user_id"].map(last)).all()
    products = set(pd.read_csv(work / "mydata" / "items.csv")["product"])
    assert final["original_top10"].map(lambda ids: 0 < len(ids) <= 10 and set(ids) <= products).all()
    assert "ok;" in outputs[0]
    shown = outputs[-2]  # python -m fellrec_flwr.data.prepared prepared/mydata
    # the README's own c17 and c23 have too few rows for the 5-core; the 40 generated customers stay
    assert "40 users" in shown and "time: column 'ts'; equal times by item id" in shown
    assert re.search(r"test\s+40\s+\[\d+, \d+\]", shown)


# ----------------------------------------------------------------------------- quoted errors


def quoted_errors() -> list[str]:
    part = section().split("Common errors", 1)[1]
    return [" ".join(q.split()) for q in re.findall(r"^- `(.*?)`", part, flags=re.M | re.S)]


def pattern(quoted: str) -> str:
    out = re.escape(quoted).replace(r"\ ", " ").replace(r"\[\.\.\.\]", r"\[.*?\]")
    return out.replace(r"data\.X", r"data\.[a-z-]+").replace("this run A", "this run .+?").replace(
        "the folder B", "the folder .+")


def test_each_quoted_error_is_what_the_code_says(tmp_path):
    from data_prep.errors import DataPrepError
    from data_prep.prepare import prepare
    from fellrec_flwr.config import ConfigError, DataSettings, from_run_config

    quoted = quoted_errors()
    assert quoted[0] == "flwr run", quoted  # the first bullet is about flwr's own message
    assert "`[code: 15] Invalid run configuration`" in section()
    with pytest.raises(ValueError, match="not present"):  # flwr's check, as in the SuperLink
        fuse_dicts(flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]),
                   {"data.user-colum": "x"}, check_keys=True)
    fix = re.search(r"names it: `(.*?)`", " ".join(section().split())).group(1)
    with pytest.raises(ConfigError, match=pattern(fix)):
        from_run_config({"data.user-colum": "customer"})

    src = tmp_path / "mydata"
    write_mydata(src)
    base = dict(dataset="table", path=str(src), user_col="customer", item_col="product", time_col="ts",
                title_col="name", partitioner="iid", num_clients=2)
    tiny = tmp_path / "tiny"  # 3 customers x 4 products: no one reaches 5 interactions
    tiny.mkdir()
    pd.DataFrame([(f"c{c}", f"p{i}", 10 * c + i) for c in range(3) for i in range(4)],
                 columns=["customer", "product", "ts"]).to_csv(tiny / "interactions.csv", index=False)
    pd.DataFrame({"product": [f"p{i}" for i in range(4)], "name": list("abcd")}).to_csv(tiny / "items.csv", index=False)
    messages = []
    for settings in (DataSettings(**{**base, "time_col": "timestamp"}),  # no time column
                     DataSettings(**{**base, "user_col": "user"}),  # missing columns
                     DataSettings(**{**base, "path": str(tiny)}),  # nothing survives the 5-core
                     DataSettings(**{**base, "num_clients": 40, "test_users": 30, "k_core": 0})):  # empty clients
        with pytest.raises(DataPrepError) as err:
            prepare(settings, tmp_path / "cache", progress=False)
        messages.append(str(err.value))
    folder = tmp_path / "prepared"
    prepare(DataSettings(**base, prepared_dir=str(folder)), "unused", progress=False)
    with pytest.raises(DataPrepError) as err:
        prepare(DataSettings(**{**base, "time_col": "when"}, prepared_dir=str(folder)), "unused", progress=False)
    messages.append(str(err.value))
    (src / "interactions.csv").write_text((src / "interactions.csv").read_text() + "c17,p100,1714999999\n")
    with pytest.raises(DataPrepError) as err:
        prepare(DataSettings(**base, prepared_dir=str(folder)), "unused", progress=False)
    messages.append(str(err.value))
    for quote in quoted[1:]:
        assert any(re.search(pattern(quote), m) for m in messages), (quote, messages)
