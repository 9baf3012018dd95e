"""A client process returns freed tensors to the system (glibc malloc settings, fellrec_flwr/model/memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fellrec_flwr.model import memory

linux_glibc = pytest.mark.skipif(memory._libc() is None, reason="glibc malloc settings only")


PROBE = """
import os, torch
from fellrec_flwr.model import memory
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20
def touch(mb):
    return torch.empty(mb * 2**18, dtype=torch.float32).fill_(1.0)  # every page resident
if SET:
    assert memory.return_freed_memory()
big = touch(16)  # by default, freeing this raises glibc's mmap threshold to 16 MB ...
del big
before = rss_mb()
held = touch(8)  # ... and this then comes from the heap and stays resident after `del`
grew = rss_mb() - before
del held
print(grew, rss_mb() - before)
"""


def freed_probe(setting: bool) -> tuple[float, float]:
    """(RSS growth while 8 MB are held, RSS left after freeing them) in a fresh process.

    A fresh process: in the test process other threads (servers of earlier tests) allocate too.
    """
    import subprocess

    out = subprocess.run([sys.executable, "-c", f"SET = {setting}\n" + PROBE], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    grew, left = (float(x) for x in out.split())
    return grew, left


@linux_glibc
def test_a_freed_tensor_leaves_the_resident_set():
    grew, left = freed_probe(True)
    assert grew > 7 and left < 2
    assert memory.trim()


@linux_glibc
def test_without_the_setting_the_freed_tensor_stays_resident():
    """The probe can fail: glibc's default keeps the freed 8 MB (the reason for the setting)."""
    grew, left = freed_probe(False)
    assert grew > 7 and left > 6


def test_the_clientapp_returns_memory_around_every_message(monkeypatch):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from client_app.app import app

    calls = []
    monkeypatch.setattr(memory, "return_freed_memory", lambda *a: calls.append("set") or True)
    monkeypatch.setattr(memory, "trim", lambda: calls.append("trim") or True)
    msg = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=5)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "num-partitions": 4}, state=RecordDict(),
                  run_config={})
    reply = app(msg, ctx)
    assert not reply.has_error() and reply.content["metrics"]["client-key"] == 3
    assert calls == ["set", "trim"]


@pytest.mark.skipif(sys.platform.startswith("linux"), reason="the no-op path is for other systems")
def test_elsewhere_the_settings_are_no_ops():
    assert not memory.return_freed_memory() and not memory.trim()
