"""A client process returns freed tensors to the system (glibc malloc settings, fellrec_flwr/model/memory.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fellrec_flwr.model import memory

PAGE = os.sysconf("SC_PAGE_SIZE")
linux_glibc = pytest.mark.skipif(memory._libc() is None, reason="glibc malloc settings only")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def touch(mb: int) -> torch.Tensor:
    return torch.empty(mb * 2**18, dtype=torch.float32).fill_(1.0)  # every page resident


@linux_glibc
def test_a_freed_tensor_leaves_the_resident_set():
    assert memory.return_freed_memory()
    big = touch(16)  # by default, freeing this raises glibc's mmap threshold to 16 MB ...
    del big
    before = rss_mb()
    held = touch(8)  # ... and this would come from the heap and stay resident after `del`
    assert rss_mb() - before > 7
    del held
    assert rss_mb() - before < 2
    assert memory.trim()


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
