"""fellrec_flwr.atomic: whole files or nothing, no temporaries left behind."""

from __future__ import annotations

import json
import stat

import pandas as pd
import pytest

from fellrec_flwr.atomic import (FILE_MODE, atomic_dir, atomic_to_parquet, atomic_write_bytes,
                                 atomic_write_json, atomic_write_text)


def test_writes_and_permissions(tmp_path):
    atomic_write_json(tmp_path / "a" / "m.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a" / "m.json").read_text()) == {"x": [1, 2]}
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == FILE_MODE
    atomic_to_parquet(pd.DataFrame({"a": [1, 2]}), tmp_path / "f.parquet")
    assert pd.read_parquet(tmp_path / "f.parquet")["a"].tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "f.parquet", "t.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = atomic_write_bytes(tmp_path / "x.bin", b"old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"not serialisable": object()})
    with pytest.raises(Exception):
        atomic_to_parquet(pd.DataFrame({"a": [object()]}), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("...")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "v1.txt").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_dir(out) as tmp:
            (tmp / "v2.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["v1.txt"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v2.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["v2.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
