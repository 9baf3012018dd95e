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
        ({"train.data-fraction": 1.5}, "train.data-fraction=1.5 must be in (0, 1]"),
        ({"train.data-fraction": 0.0}, "train.data-fraction=0.0 must be in (0, 1]"),
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


# --------------------------------------------------------------------------- one source per setting
def _allowed_value_tuples() -> dict[str, frozenset[str]]:
    """config.py's module-level tuples of allowed string values (STRATEGIES, SIMILARITY_BASES, ...)."""
    import ast

    tree = ast.parse((ROOT / "fellrec_flwr" / "config.py").read_text())
    out = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and len(node.value.elts) > 1
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.value.elts)):
            out[node.targets[0].id] = frozenset(e.value for e in node.value.elts)
    return out


def test_allowed_values_are_listed_only_in_config():
    """A second tuple of the same allowed values (strategies/fellrec.py and fellrec_math.py had
    three) drifts from config.py's; code checks against the config's tuple instead."""
    import ast

    allowed = _allowed_value_tuples()
    assert {"SIMILARITY_BASES", "SIMILARITY_KERNELS", "HEATING_EXPONENTS", "HEATING_LOSSES"} <= set(allowed)
    copies = []
    for folder in ("fellrec_flwr", "strategies", "server_app", "client_app", "data_prep", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "fellrec_flwr" / "config.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) > 1 and all(
                        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                    values = frozenset(e.value for e in node.elts)
                    copies += [f"{path.relative_to(ROOT)}:{node.lineno} repeats {name}"
                               for name, known in allowed.items() if values == known]
    assert not copies, "; ".join(copies)


@pytest.mark.parametrize("key, value", [("fellrec.alpha", 0), ("fellrec.temperature", -1.0),
                                        ("fellrec.similarity-temperature", 0.0), ("fellrec.beta", 0)])
def test_fellrec_numbers_are_checked_in_the_config(key, value):
    with pytest.raises(ConfigError, match=re.escape(key)):
        from_run_config({key: value})


def test_overrides_in_several_strings_keep_every_key():
    from fellrec_flwr.config import check_overrides, keys_flower_drops, parse_overrides

    items = ["train.data-fraction=0.075 num-server-rounds=4", "train.batch-size=16"]
    assert parse_overrides(items) == {"train.data-fraction": 0.075, "num-server-rounds": 4, "train.batch-size": 16}
    assert parse_overrides([" ".join(items)]) == parse_overrides(items)
    assert parse_overrides([]) == {}
    # Flower's own parser, given the strings one by one, loses train.data-fraction: `flwr run` is refused here
    assert keys_flower_drops(items) == ["train.data-fraction"]
    assert keys_flower_drops(["train.lr=0.1", "lora.r=4"]) == []  # other tables: nothing lost
    with pytest.raises(ConfigError, match="flwr would drop train.data-fraction.*one --run-config string"):
        check_overrides(items)
    assert check_overrides([" ".join(items)]).train.data_fraction == 0.075
