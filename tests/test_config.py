"""The typed config, pyproject's run config and the README table agree, and bad keys fail clearly."""

from __future__ import annotations

import re
import tomllib

import pytest

from fellrec_flwr.config import ConfigError, FellRecConfig, from_run_config, known_keys
from conftest import ROOT


def _pyproject_run_config() -> dict:
    from flwr.common.config import flatten_dict

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten_dict(data["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_equal_dataclass_defaults():
    assert _pyproject_run_config() == known_keys()
    assert from_run_config(_pyproject_run_config()) == FellRecConfig()


def test_every_key_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9.\-]+)` \|", readme, flags=re.M))
    assert set(known_keys()) <= documented, set(known_keys()) - documented


def test_overrides_are_typed_and_nested():
    cfg = from_run_config({"strategy": "fedprox", "model.name": "x", "train.lr": "0.5", "lora.r": 4.0,
                           "fellrec.heating": "false"})
    assert (cfg.strategy, cfg.model.name, cfg.train.lr, cfg.lora.r, cfg.fellrec.heating) == ("fedprox", "x", 0.5, 4, False)
    assert from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy": "fedsgd"}, "strategy='fedsgd' is not one of"),
        ({"no-such-key": 1}, "Unknown config key 'no-such-key'"),
        ({"lr": 0.1}, "Did you mean 'train.lr'"),
        ({"data.user-colum": "u"}, "Unknown config key 'data.user-colum'. Did you mean 'data.user-col'"),
        ({"data.kcore": 3}, "Did you mean 'data.k-core'"),
        ({"num-rounds": 3}, "Did you mean 'num-server-rounds'"),
        ({"data.order": "random"}, "data.order='random' is not one of time, file"),
        ({"lora.r": 2.5}, "lora.r=2.5 must be an integer"),
        ({"fellrec.heating": "maybe"}, "must be true or false"),
        ({"min-clients": 9}, "exceeds data.num-clients"),
        ({"fraction-train": 0.0}, "fraction-train=0.0 must be in (0, 1]"),
        ({"split.enabled": True, "split.front-k": 0}, "split.front-k and split.back-k must be >= 1"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_run_config(overrides)


def test_every_data_prep_flag_is_a_run_config_key():
    """One source of truth: python -m data_prep's flags are generated from the data.* keys."""
    from data_prep.__main__ import parser

    flags = {a.option_strings[0] for a in parser()._actions if a.option_strings}
    data_keys = {k for k in known_keys() if k.startswith("data.")}
    assert {"--" + k.removeprefix("data.") for k in data_keys} <= flags
    assert flags - {"--" + k.removeprefix("data.") for k in data_keys} == {"-h", "--seed", "--cache-root", "--quiet"}


def test_data_prep_help_is_instant():
    import subprocess
    import sys
    import time

    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "data_prep", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "--user-col" in out and time.perf_counter() - started < 3.0
    imported = subprocess.run([sys.executable, "-c", "import sys, data_prep.__main__; "
                               "print(sorted({'pandas', 'torch', 'numpy', 'flwr'} & set(sys.modules)))"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"  # heavy imports wait until a data set is really prepared


def test_split_runs_keep_constrained_decoding_but_refuse_the_title_prior():
    assert from_run_config({}).eval.decoding == "constrained"
    assert from_run_config({"split.enabled": True}).eval.decoding == "constrained"
    with pytest.raises(ConfigError, match="eval.prior-weight=0"):
        from_run_config({"split.enabled": True, "eval.prior-weight": 0.5})
