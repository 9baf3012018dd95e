"""Hardening (issue 15): one regression test per finding the attacker / careless-client probes
found. Each test fails on the code before the fix. The split service now runs on gRPC; findings
that were about the former hand-written HTTP layer are re-expressed for it (see the map in
docs/security.md). The deploy-level findings (1, 15's README, 18) are covered in test_deploy.py /
test_security's deploy section.
"""

from __future__ import annotations

import gc
import http.client
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import numpy as np
import pytest
import torch

from conftest import ROOT
from fellrec_flwr import atomic
from fellrec_flwr.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fellrec_flwr.config import ConfigError, from_run_config
from fellrec_flwr.split import engine
from fellrec_flwr.split.plan import SplitError
from fellrec_flwr.split.auth import issue_token, write_secret
from fellrec_flwr.split.client import SplitServiceClient, SplitServiceError
from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer
from fellrec_flwr.split.wire import ERROR_CODE_KEY, encode, method_path
from server_app import split_service
from server_app.split_service import ServiceLimits, SplitService, make_body, start_service

SECRET = b"test-secret-0123456789abcdef"
TITLES = ["Super Mario Odyssey", "The Legend of Zelda", "Halo 3", "Minecraft", "Mario Kart 8"]
H = 64
C = grpc.StatusCode


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    tok = train_tokenizer(TITLES * 3, 300, tmp_path_factory.mktemp("tok") / "tokenizer")
    return build_tiny_model(tok, hidden=H, layers=4, heads=4, seed=0).eval()


@pytest.fixture(scope="module")
def service(full):
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(max_batch=8, max_seq=64, max_tokens=256,
                                                                   max_body_bytes=1 << 20))
    yield handle
    handle.stop()


def _client(url, key="client-0", **kw):
    return SplitServiceClient(url, key, issue_token(SECRET, key), **kw)


def _auth(key="client-0"):
    return (("x-client-key", key), ("x-client-token", issue_token(SECRET, key)))


def _tensors(b=2, q=5):
    return {"hidden": torch.randn(b, q, H), "position_ids": torch.arange(q, dtype=torch.int32)[None]}


def _raw(url, method, body=b"", metadata=None, timeout=30):
    """One call on a fresh channel, no retries: (C.OK, reply bytes) or (gRPC code, engine code, message)."""
    with grpc.insecure_channel(urlsplit(url).netloc, options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            return C.OK, channel.unary_unary(method_path(method))(body, metadata=metadata, timeout=timeout)
        except grpc.RpcError as err:
            return err.code(), dict(err.trailing_metadata() or ()).get(ERROR_CODE_KEY), err.details()



# -- High 2: kept graphs ----------------------------------------------------------------------------


def test_an_evicted_kept_graph_frees_its_saved_tensors(full, monkeypatch):
    """The saved-tensor hook used to return the tensor itself: a saved output then referenced its
    own autograd node, a cycle through C++ that not even the garbage collector frees, so every
    kept graph leaked its activations after eviction."""
    service = SplitService(make_body(full, 1, 1), SECRET, ServiceLimits(activation_cache_bytes=64 << 20))
    packed = []
    real_pack = engine._SavedBytes.pack

    def spy(self, x):
        saved = real_pack(self, x)
        if x.untyped_storage().data_ptr() not in self.param_ptrs:  # weights stay alive anyway
            packed.append(weakref.ref(saved))
        return saved

    monkeypatch.setattr(engine._SavedBytes, "pack", spy)
    service.forward("c", encode(_tensors(2, 8), {"keep_graph": "1"}))
    assert len(service._activations) == 1 and packed
    service._activations.clear()
    gc.collect()
    alive = sum(ref() is not None for ref in packed)
    assert alive == 0, f"{alive} of {len(packed)} saved activations outlived their evicted graph"


FLOOD = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer
    from fellrec_flwr.split.wire import encode
    from fellrec_flwr.split.engine import ServiceLimits, SplitService, make_body
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    tok = train_tokenizer(["Super Mario", "Zelda", "Halo 3", "Minecraft"] * 3, 300, {tok!r})
    body = make_body(build_tiny_model(tok, hidden=64, layers=4, heads=4, seed=0).eval(), 1, 1)
    service = SplitService(body, b"x" * 32, ServiceLimits(activation_cache_bytes={cap}))
    data = encode({{"hidden": torch.randn(8, 128, 64),
                    "position_ids": torch.arange(128, dtype=torch.int32)[None]}}, {{"keep_graph": "1"}})
    service.forward("c", data)  # warm: allocator pools, lazy imports
    base = rss()
    for _ in range({n}):
        service.forward("c", data)  # never backed
    print(json.dumps({{"growth": rss() - base, "kept": len(service._activations),
                      "counted": service.activation_bytes()}}))
""")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_rss_stays_within_the_activation_cap_under_a_flood_of_kept_graphs(tmp_path):
    """60 never-backed [8,128,64] forwards with a 64 MB cap: RSS grows by at most the cap + 64 MB
    (before the fix: +1,130 MB for 120 forwards, bench command in docs/security.md)."""
    cap, overhead = 64 << 20, 64 << 20
    script = FLOOD.format(root=str(ROOT), tok=str(tmp_path / "tok"), cap=cap, n=60)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 < result["counted"] <= cap
    assert result["growth"] <= cap + overhead, f"RSS grew {result['growth'] >> 20} MB (cap 64 MB + 64 MB overhead)"


# -- Medium 3: per-client quota -----------------------------------------------------------------


def _step(client, sid, b, q, past):
    return client.infer_step(sid, torch.randn(b, q, H), None,
                             torch.arange(past, past + q, dtype=torch.int32)[None], past)


def test_an_oversized_step_is_refused_and_never_costs_another_client_its_session(full):
    # 2 server layers x K,V x 64 floats = 1 KB per token and row
    limits = ServiceLimits(session_cache_bytes=64 << 10, session_bytes_per_client=16 << 10, max_seq=256,
                           max_tokens=4096, max_batch=16, session_evict_idle_s=3600, max_body_bytes=64 << 10)
    handle = start_service(full, SECRET, 1, 1, limits=limits)
    try:
        alice, bob = _client(handle.url, "alice", retries=0), _client(handle.url, "bob", retries=0)
        _, sid = _step(alice, "", 1, 4, 0)
        with pytest.raises(SplitServiceError) as err:
            _step(bob, "", 4, 8, 0)  # 32 KB > bob's 16 KB quota
        assert err.value.status == 413 and err.value.code == "session_too_large"
        assert "quota" in str(err.value)
        with pytest.raises(SplitServiceError) as err:
            _step(bob, "", 2, 150, 0)  # a 77 KB message > the 64 KB limit: refused unread by gRPC
        assert err.value.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.code == "message_too_large"
        # within his quota, bob fills the service: alice (active) is never evicted for him
        bobs = [_step(bob, "", 1, 12, 0)[1]]
        bobs += [_step(_client(handle.url, f"bob-{i}", retries=0), "", 1, 12, 0)[1] for i in range(3)]
        with pytest.raises(SplitServiceError) as err:
            _step(_client(handle.url, "carol", retries=0), "", 1, 13, 0)
        assert err.value.status == 503 and err.value.code == "service_full"
        out, same = _step(alice, sid, 1, 1, 4)
        assert same == sid and out.shape == (1, 1, H)
    finally:
        handle.stop()


def test_the_kv_estimate_matches_the_real_cache(full):
    handle = start_service(full, SECRET, 1, 1)
    try:
        _step(_client(handle.url), "", 2, 5, 0)
        (session,) = handle.service._sessions.values()
        assert session.nbytes == handle.service._kv_bytes(2, 5)
    finally:
        handle.stop()


# -- Medium 5: TCP_NODELAY ------------------------------------------------------------------------


def _tcp_connections(port: int) -> list[tuple[str, bool]]:
    """('server' | 'client', TCP_NODELAY) for each of this process's TCP connections on `port`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                peer, local = sock.getpeername(), sock.getsockname()
            except OSError:  # listening, or not connected
                continue
            if port in (peer[1], local[1]):
                found.append(("server" if local[1] == port else "client",
                              bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))))
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="lists this process's sockets in /proc")
def test_tcp_nodelay_on_both_ends_and_no_delayed_ack_stall(service):
    """Before: ~44 ms per keep-alive request (Nagle + delayed ACK). gRPC sets TCP_NODELAY itself;
    this checks both ends of the live connection and the per-step latency."""
    client = _client(service.url)
    _, sid = _step(client, "", 1, 2, 0)
    ends = _tcp_connections(service.port)
    assert {"server", "client"} <= {side for side, _ in ends}, ends
    assert all(nodelay for _, nodelay in ends), ends
    times = []
    for i in range(2, 22):
        start = time.perf_counter()
        _, sid = _step(client, sid, 1, 1, i)
        times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 0.030  # Nagle + delayed ACK: >= 40 ms per request
    client.close()


# -- Medium 6: the token only over TLS ------------------------------------------------------------


def test_token_is_not_sent_over_plain_http_to_another_machine_or_with_a_ca(tmp_path):
    with pytest.raises(SplitError, match="in clear"):
        SplitServiceClient("http://10.0.0.5:8470", "client-0", "t")
    with pytest.raises(SplitError, match="CA file is configured"):
        SplitServiceClient("http://127.0.0.1:8470", "client-0", "t", ca_file=tmp_path / "ca.crt")
    with pytest.raises(SplitError, match="must look like"):
        SplitServiceClient("https://fl.example.org:8470/v1", "client-0", "t")  # a path means an HTTP URL was kept
    SplitServiceClient("http://10.0.0.5:8470", "client-0", "t", allow_insecure_http=True)  # the dev flag
    SplitServiceClient("http://127.0.0.1:8470", "client-0", "t")  # loopback: nothing leaves the machine
    SplitServiceClient("https://fl.example.org:8470", "client-0", "t")


# -- Low 7: no internals in an INTERNAL error, no retry; malformed payloads are INVALID_ARGUMENT -----


def test_an_internal_error_leaks_nothing_and_is_not_retried(service, monkeypatch, caplog):
    calls = []

    def broken(self, client, data, deadline=None):
        calls.append(1)
        raise RuntimeError("secret internals at /srv/model/weights.bin")

    monkeypatch.setitem(split_service._ROUTES, "Forward", broken)
    caplog.set_level(logging.ERROR, logger="fellrec.split_service")
    code, err_code, message = _raw(service.url, "Forward", encode(_tensors()), _auth())
    assert (code, err_code) == (C.INTERNAL, "internal_error") and "incident" in message
    for leak in ("secret", "RuntimeError", "Traceback", "weights.bin"):
        assert leak not in message
    assert "secret internals" in caplog.text  # the operator has it, in the service log
    calls.clear()
    with pytest.raises(SplitServiceError) as err:
        _client(service.url, backoff=0.01).forward(torch.randn(2, 5, H), None,
                                                   torch.arange(5, dtype=torch.int32)[None])
    assert err.value.status == 500 and err.value.grpc_code == C.INTERNAL and len(calls) == 1  # not retried


def _safetensors(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + payload


@pytest.mark.parametrize("name,body", [
    ("string offsets", _safetensors({"hidden": {"dtype": "F32", "shape": [1, 1, H], "data_offsets": ["0", "x"]},
                                     "position_ids": {"dtype": "I32", "shape": [1, 1], "data_offsets": [0, 4]}},
                                    b"\0" * 4)),
    ("offsets not matching the shape", _safetensors(
        {"hidden": {"dtype": "F32", "shape": [1, 1, H], "data_offsets": [0, 8]},
         "position_ids": {"dtype": "I32", "shape": [1, 1], "data_offsets": [8, 12]}}, b"\0" * 12)),
    ("deeply nested header", (lambda raw: len(raw).to_bytes(8, "little") + raw)(b"[" * 100000 + b"]" * 100000)),
])
def test_malformed_payloads_are_invalid_argument_not_internal(service, name, body):
    code, err_code, message = _raw(service.url, "Forward", body, _auth())
    assert (code, err_code) == (C.INVALID_ARGUMENT, "bad_body"), (name, code, err_code, message)
    assert "Traceback" not in message


def test_deeply_nested_json_is_invalid_argument(service):
    got = _raw(service.url, "InferClose", b'{"sessions": ' + b"[" * 20000 + b"]" * 20000 + b"}", _auth())
    assert got[:2] == (C.INVALID_ARGUMENT, "bad_json")


# -- Low 8 and 15: private files from the first byte -------------------------------------------------


def test_the_secret_file_is_never_readable_by_others(tmp_path, monkeypatch):
    modes = []
    real_replace = os.replace

    def spy(src, dst):
        modes.append(stat.S_IMODE(os.stat(src).st_mode))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", spy)
    old = os.umask(0o022)
    try:
        write_secret(tmp_path / "secret.txt")
    finally:
        os.umask(old)
    assert modes == [0o600]  # at the rename already, not fixed up afterwards
    assert stat.S_IMODE((tmp_path / "secret.txt").stat().st_mode) == 0o600


def test_outputs_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.atomic_write_json(tmp_path / "new" / "deeper" / "a.json", {"x": 1})
        with atomic.atomic_dir(tmp_path / "prepared") as tmp:
            (tmp / "data.parquet").write_bytes(b"x")
        save_checkpoint(tmp_path / "run", Checkpoint(round=1, strategy_state={}, global_arrays={}))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "new" / "deeper" / "a.json") == 0o600
    assert mode(tmp_path / "new") == mode(tmp_path / "new" / "deeper") == 0o700
    assert mode(tmp_path / "prepared") == 0o700
    assert mode(tmp_path / "run" / "checkpoint.safetensors") == 0o600


# -- Low 16: stale temporaries --------------------------------------------------------------------


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_file = tmp_path / f".m.json.{dead_pid}.abc123.tmp"
    stale_dir = tmp_path / f".prepared.{dead_pid}.xyz789.tmp"
    live = tmp_path / f".m.json.{os.getppid()}.live00.tmp"  # a running writer's: kept
    fresh_dead = tmp_path / f".other.{dead_pid}.new000.tmp"  # too young to judge: kept
    stale_file.write_text("half")
    stale_dir.mkdir()
    (stale_dir / "x").write_text("half")
    live.write_text("busy")
    fresh_dead.write_text("half")
    old = time.time() - 2 * atomic.STALE_AFTER_S
    for p in (stale_file, stale_dir, live):
        os.utime(p, (old, old))
    atomic.atomic_write_json(tmp_path / "m.json", {"x": 1})  # a writer cleans its own target first
    with atomic.atomic_dir(tmp_path / "prepared", overwrite=True):
        pass
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and fresh_dead.exists()


# -- Low 9, 10, 11, 13: the transport (formerly hand-written HTTP, now gRPC) ----------------------


def test_metadata_cannot_inject_log_lines(service, caplog):
    """Before: headers folded across lines reached the log. gRPC refuses CR/LF in metadata values
    (on both ends); what the service logs of a client key is repr-escaped and capped."""
    caplog.set_level(logging.INFO, logger="fellrec.split_service")
    injected = (("x-client-key", "client-0\r\nX-Injected: 1"), ("x-client-token", "t"))
    try:
        got = _raw(service.url, "Info", metadata=injected)
    except ValueError:  # refused by the library before sending
        got = (None,)
    assert got[0] != C.OK
    long_key = "k" * 5000
    got = _raw(service.url, "Info", metadata=(("x-client-key", long_key), ("x-client-token", "t")))
    assert got[:2] == (C.PERMISSION_DENIED, "bad_credentials")
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert refused and all("\n" not in m and "X-Injected" not in m and len(m) < 400 for m in refused), refused


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame (RFC 9113 §4.1)."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, no Huffman (RFC 7541 §6.2.2); short strings only."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def _answer_frames(sock: socket.socket, buffer: bytearray, kinds: list[int]) -> None:
    """Read what the server sent, ACK its SETTINGS and PINGs (as a live peer would), note frame types."""
    while len(buffer) >= 9:
        size = int.from_bytes(buffer[:3], "big")
        if len(buffer) < 9 + size:
            return
        kind, flags, payload = buffer[3], buffer[4], bytes(buffer[9:9 + size])
        del buffer[:9 + size]
        kinds.append(kind)
        if kind == 4 and not flags & 1:
            sock.sendall(_frame(4, 1, 0))
        elif kind == 6 and not flags & 1:
            sock.sendall(_frame(6, 1, 0, payload))


def test_a_sender_that_never_finishes_its_message_is_cut_and_blocks_no_one(full):
    """Before: a request dripped a byte at a time held a server thread forever. Now a connection
    lives at most request_timeout_s (GOAWAY), its calls in flight get as long again, then it is
    closed; meanwhile the other clients are served. The drip is raw HTTP/2, as an attacker's would
    be: a valid gRPC call whose 1000-byte message never completes, from a peer that answers pings."""
    # 4 workers: the drip holds one of the two compute slots while it reads (issue 24), the client the other
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(request_timeout_s=1.0, max_workers=4))
    try:
        headers = b"".join(_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", method_path("Forward")), (":authority", "x"),
            ("content-type", "application/grpc"), ("te", "trailers"), *_auth()))
        kinds: list[int] = []
        with socket.create_connection(("127.0.0.1", handle.port), timeout=10) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0) + _frame(1, 4, 1, headers)
                         + _frame(0, 0, 1, b"\0" + (1000).to_bytes(4, "big") + b"x" * 10))
            start = time.monotonic()
            out, _ = _client(handle.url, retries=0).forward(torch.randn(1, 3, H), None,
                                                            torch.arange(3, dtype=torch.int32)[None])
            assert out.shape == (1, 3, H)  # another client is served while the drip goes on
            sock.settimeout(0.2)
            buffer, closed = bytearray(), False
            while not closed and time.monotonic() - start < 15:
                try:
                    sock.sendall(_frame(0, 0, 1, b"x"))  # one more byte of the message
                    chunk = sock.recv(65536)
                    closed = chunk == b""
                    buffer += chunk
                    _answer_frames(sock, buffer, kinds)
                except socket.timeout:
                    pass
                except OSError:
                    closed = True
            elapsed = time.monotonic() - start
        assert closed and 0.8 < elapsed < 8, f"closed={closed} after {elapsed:.1f} s"
        assert 7 in kinds  # GOAWAY: cut by the connection-age limit, not a protocol error
    finally:
        handle.stop()


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _call_headers(method: str, metadata=()) -> bytes:
    return b"".join(_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", method_path(method)), (":authority", "x"),
        ("content-type", "application/grpc"), ("te", "trailers"), *metadata))


def _silent_call(port: int, method: str, metadata=()) -> socket.socket:
    """A connection whose one call sends its headers and never its message (raw HTTP/2)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_PREFACE + _frame(4, 0, 0) + _frame(1, 4, 1, _call_headers(method, metadata)))  # END_HEADERS only
    return sock


def test_silent_unauthenticated_senders_hold_no_worker(full):
    """Issue 24, F1. Before: 16 calls that sent headers but never a message held all 16 workers
    (the message was read on a worker before any check), and Health, Info and every client timed
    out. Now credentials are checked on the metadata before a worker reads anything: a call
    without them is refused at once, and Health never reads its request. 32 silent senders (no
    credentials, a wrong token, or Health) against the default 16 workers."""
    handle = start_service(full, SECRET, 1, 1)
    bad = (("x-client-key", "mallory"), ("x-client-token", "0" * 64))
    socks = []
    try:
        for i in range(32):
            socks.append(_silent_call(handle.port, *[("Forward", ()), ("Forward", bad), ("Health", ())][i % 3]))
        time.sleep(0.5)  # every call has reached the server
        start = time.monotonic()
        got = _raw(handle.url, "Health", timeout=5)
        health_s = time.monotonic() - start
        assert got == (C.OK, b'{"status": "ok"}'), got
        assert _raw(handle.url, "Info", metadata=_auth(), timeout=5)[0] == C.OK
        t = _tensors(1, 3)
        start = time.monotonic()
        out, _ = _client(handle.url, retries=0, timeout=5).forward(t["hidden"], None, t["position_ids"])
        forward_s = time.monotonic() - start
        assert out.shape == (1, 3, H)
        print(f"\n32 silent unauthenticated senders, 16 workers: Health answered in {health_s * 1000:.0f} ms, "
              f"an authenticated Forward in {forward_s * 1000:.0f} ms")
    finally:
        for sock in socks:
            sock.close()
        handle.stop()


def test_an_authenticated_message_must_arrive_within_the_read_timeout(full, caplog):
    """Issue 24: a token holder whose message never completes is cut after read_timeout_s
    (RST_STREAM on that call, the connection stays), which frees its compute slot; before, only the
    connection's age limit (default 300 s, twice that with its grace) ended it. One compute slot
    here (3 workers), held by the drip until the cut; then another client is served."""
    caplog.set_level("INFO", logger="fellrec.split_service")
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(read_timeout_s=1.0, request_timeout_s=60,
                                                                   max_workers=3))
    try:
        kinds: list[int] = []
        with socket.create_connection(("127.0.0.1", handle.port), timeout=10) as sock:
            sock.sendall(_PREFACE + _frame(4, 0, 0) + _frame(1, 4, 1, _call_headers("Forward", _auth()))
                         + _frame(0, 0, 1, b"\0" + (1000).to_bytes(4, "big") + b"x" * 10))
            start = time.monotonic()
            sock.settimeout(0.2)
            buffer = bytearray()
            while 3 not in kinds and time.monotonic() - start < 10:  # until RST_STREAM
                try:
                    buffer += sock.recv(65536)
                    _answer_frames(sock, buffer, kinds)
                except socket.timeout:
                    pass
            elapsed = time.monotonic() - start
        assert 3 in kinds and 7 not in kinds, kinds  # the call was reset, not the connection
        assert 0.8 < elapsed < 5, f"cut after {elapsed:.1f} s"
        t = _tensors(1, 3)
        out, _ = _client(handle.url, retries=3, timeout=10).forward(t["hidden"], None, t["position_ids"])
        assert out.shape == (1, 3, H)
        logged = lambda: any("no complete message within 1 s (--read-timeout)" in r.getMessage()  # noqa: E731
                             for r in caplog.records)
        deadline = time.monotonic() + 3
        while not logged() and time.monotonic() < deadline:  # the worker logs once it has woken up
            time.sleep(0.05)
        assert logged()
    finally:
        handle.stop()


def test_connections_and_streams_per_connection_are_capped(full):
    """Issue 24: what one peer can hold is bounded. Connections beyond max_connections are closed
    by the library at once; each connection is told it may open at most max_workers streams."""
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(max_connections=4, max_workers=5))
    socks = []
    try:
        for _ in range(6):
            socks.append(socket.create_connection(("127.0.0.1", handle.port), timeout=5))
            socks[-1].sendall(_PREFACE + _frame(4, 0, 0))
        replies = []
        for sock in socks:
            try:
                replies.append(sock.recv(65536))
            except OSError:
                replies.append(b"")
        assert [bool(r) for r in replies] == [True] * 4 + [False] * 2  # the 5th and 6th are closed unanswered
        settings = replies[0][9:9 + int.from_bytes(replies[0][:3], "big")]  # the server's first frame: SETTINGS
        assert replies[0][3] == 4
        announced = {int.from_bytes(settings[i:i + 2], "big"): int.from_bytes(settings[i + 2:i + 6], "big")
                     for i in range(0, len(settings), 6)}
        assert announced.get(3) == 5  # SETTINGS_MAX_CONCURRENT_STREAMS
    finally:
        for sock in socks:
            sock.close()
        handle.stop()


# Three concurrent calls of one big message each, from another process (its memory is not ours).
UNAUTHENTICATED_SENDERS = textwrap.dedent("""
    import grpc, json, sys, threading
    body = b"\\0" * ({mb} << 20)
    codes = []
    def send(metadata):
        with grpc.insecure_channel("127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
            try:
                channel.unary_unary("/fellrec.split.v2.SplitService/Forward")(body, metadata=metadata, timeout=60)
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
    threads = [threading.Thread(target=send, args=(m,)) for m in {metadatas!r}]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps(sorted(codes)))
""")


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_unauthenticated_messages_are_refused_unread(full):
    """Issue 24, F2. Before: a message was read whole before its credentials were checked, so three
    concurrent 200 MB messages without credentials raised the service's RSS by about 1.3 GB (and
    most of it stayed). Now the call is refused on its metadata and the message is never read: the
    service's RSS, sampled every 5 ms, rises by < 50 MB. The message limit is raised to 512 MB here
    so that only the credential check stands in the way."""
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(max_body_bytes=512 << 20))
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    try:
        before = _rss_mb()
        sampler = threading.Thread(target=sample)
        sampler.start()
        metadatas = [None, None, (("x-client-key", "mallory"), ("x-client-token", "0" * 64))]
        script = UNAUTHENTICATED_SENDERS.format(mb=200, port=handle.port, metadatas=metadatas)
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - start
        done.set()
        sampler.join()
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout) == ["PERMISSION_DENIED", "UNAUTHENTICATED", "UNAUTHENTICATED"]
        rise = peak[0] - before
        print(f"\nthree 200 MB unauthenticated messages: service RSS {before:.0f} -> peak {peak[0]:.0f} MB "
              f"(+{rise:.0f} MB), refused in {elapsed:.1f} s")
        assert rise < 50, f"RSS rose {rise:.0f} MB"
    finally:
        done.set()
        handle.stop()


def test_the_deadline_bounds_the_wait_for_compute_not_the_compute(full):
    """The client's per-call deadline travels with the call: a call that waited past it behind
    other clients' compute is refused (DEADLINE_EXCEEDED) and nothing is computed for it; a wait
    within the deadline is served."""
    handle = start_service(full, SECRET, 1, 1)
    lock = handle.service._lock

    def hold(seconds: float) -> threading.Thread:
        acquired = threading.Event()

        def run() -> None:
            with lock:
                acquired.set()
                time.sleep(seconds)

        thread = threading.Thread(target=run)
        thread.start()
        acquired.wait(5)
        return thread

    t = _tensors(1, 3)
    try:
        holder = hold(2.0)
        before = handle.service.stats["compute_s"]
        with pytest.raises(SplitServiceError) as err:
            _client(handle.url, timeout=0.5, retries=0).forward(t["hidden"], None, t["position_ids"])
        assert err.value.grpc_code == C.DEADLINE_EXCEEDED
        holder.join()
        time.sleep(0.2)
        assert handle.service.stats["compute_s"] == before  # the server gave up too: nothing computed
        holder = hold(1.0)
        out, _ = _client(handle.url, timeout=10, retries=0).forward(t["hidden"], None, t["position_ids"])
        holder.join()
        assert out.shape == (1, 3, H)
    finally:
        handle.stop()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening socket's backlog with ss")
def test_listen_backlog_is_not_5(full):
    """Before: http.server's listen(5). gRPC listens with the system's maximum (somaxconn)."""
    handle = start_service(full, SECRET, 1, 1)
    try:
        ss = subprocess.run(["ss", "-ltnH", f"sport = :{handle.port}"], capture_output=True, text=True)
        if ss.returncode != 0 or not ss.stdout.strip():
            pytest.skip("ss is not available")
        assert int(ss.stdout.split()[2]) >= 128  # Send-Q of a listening socket = its backlog
    finally:
        handle.stop()


def test_oversized_or_unknown_calls_never_reach_the_engine(service, monkeypatch):
    """Before: GET bodies and Transfer-Encoding were request-smuggling shapes in our parser. Now the
    library frames every message; too big a message is RESOURCE_EXHAUSTED before any handler runs
    (nothing is allocated for it by us), an unknown method UNIMPLEMENTED. Health never reads its
    request (issue 24: a silent Health caller must hold no worker), so a body is discarded unread;
    Info, which reads, refuses one."""
    reached = []
    monkeypatch.setitem(split_service._ROUTES, "Forward", lambda *a, **k: reached.append(1) or b"")
    code, err_code, message = _raw(service.url, "Forward", b"\0" * (2 << 20), _auth())
    assert code == C.RESOURCE_EXHAUSTED and err_code is None and "larger than max" in message
    assert reached == []
    assert _raw(service.url, "Backdoor", b"x", _auth())[0] == C.UNIMPLEMENTED
    assert _raw(service.url, "Health", b"hello") == (C.OK, b'{"status": "ok"}')
    assert _raw(service.url, "Info", b"hello", _auth())[:2] == (C.INVALID_ARGUMENT, "unexpected_body")
    with pytest.raises(SplitServiceError) as err:  # the client names it
        _client(service.url, retries=3).forward(torch.randn(80, 64, H), None,
                                                torch.arange(64, dtype=torch.int32)[None])
    assert err.value.status == 413 and err.value.code == "message_too_large"


# -- Low 12: limits before allocation -------------------------------------------------------------


def test_shapes_and_limits_are_checked_before_decoding(service, monkeypatch):
    decoded = []
    real = engine.decode
    monkeypatch.setattr(engine, "decode", lambda data: decoded.append(1) or real(data))
    got = _raw(service.url, "Forward", encode(_tensors(9, 2)), _auth())  # batch 9 > 8
    assert got[:2] == (C.RESOURCE_EXHAUSTED, "batch_too_large")
    got = _raw(service.url, "Forward", encode({"hidden": torch.randn(1, 2, H + 3),
                                               "position_ids": torch.zeros(1, 2, dtype=torch.int32)}), _auth())
    assert got[:2] == (C.INVALID_ARGUMENT, "bad_hidden_size")
    assert decoded == []
    assert _raw(service.url, "Forward", encode(_tensors()), _auth())[0] == C.OK and decoded == [1]


# -- Low 14: health and info ----------------------------------------------------------------------


def test_health_answers_while_compute_runs_and_tells_nothing(full):
    """Health needs no token, never waits for the compute lock and always finds a worker: compute
    calls may occupy all but two workers (more get UNAVAILABLE service_busy and are retried)."""
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(max_workers=4))
    service = handle.service
    t = _tensors(1, 3)
    waiting: list[tuple] = []
    service._lock.acquire()
    try:
        threads = [threading.Thread(target=lambda: waiting.append(
            _client(handle.url, retries=0, timeout=20).forward(t["hidden"], None, t["position_ids"])))
            for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # both now hold a compute slot and wait for the lock
        with pytest.raises(SplitServiceError) as err:
            _client(handle.url, retries=0).forward(t["hidden"], None, t["position_ids"])
        assert (err.value.grpc_code, err.value.code) == (C.UNAVAILABLE, "service_busy")
        code, reply = _raw(handle.url, "Health", timeout=3)
        assert code == C.OK and json.loads(reply) == {"status": "ok"}
        assert _raw(handle.url, "Info", timeout=3)[:2] == (C.UNAUTHENTICATED, "missing_credentials")
        assert _raw(handle.url, "Info", metadata=_auth(), timeout=3)[0] == C.OK
    finally:
        service._lock.release()
    for thread in threads:
        thread.join(20)
    try:
        assert len(waiting) == 2  # served once the lock was free
    finally:
        handle.stop()


# -- Issue 24, F4-F8: configuration the service refuses, and what Info tells whom ---------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.7.7", "split.example.org"])
def test_plaintext_on_a_non_loopback_address_needs_insecure(full, host):
    """F4. Before: the service listened in plaintext on any address (tokens in clear)."""
    with pytest.raises(SplitError, match="without TLS.*--insecure"):
        start_service(full, SECRET, 1, 1, host=host)


def test_plaintext_on_all_interfaces_with_insecure_starts(full):
    handle = start_service(full, SECRET, 1, 1, host="0.0.0.0", insecure=True)
    try:
        assert handle.url.startswith("http://") and _raw(f"http://127.0.0.1:{handle.port}", "Health")[0] == C.OK
    finally:
        handle.stop()


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        split_service.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_a_session_cache_below_the_client_quota_is_refused(tmp_path, capsys):
    """F5. Before: --session-cache-mb below --session-quota-mb was accepted silently, and one token
    holder could fill the whole cache and keep every other client out (service_full)."""
    secret = tmp_path / "secret.txt"
    write_secret(secret, SECRET)
    err = _cli_error(capsys, ["--model", str(tmp_path / "none"), "--secret-file", str(secret),
                              "--session-cache-mb", "256", "--session-quota-mb", "512"])
    assert "--session-cache-mb 256 is below --session-quota-mb 512" in err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_a_tls_key_that_does_not_match_the_certificate_is_named(full, tmp_path):
    """F6. Before: a mismatched key gave 'cannot listen ... port in use, or not an address of this
    machine'. Now the pair is checked first and the error says what is wrong."""
    for name in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.pem"),
                        "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    with pytest.raises(ValueError, match="the key does not match the certificate") as err:
        start_service(full, SECRET, 1, 1, tls_cert=tmp_path / "a.pem", tls_key=tmp_path / "b.key")
    assert "port in use" not in str(err.value)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="not a PEM certificate and its private key"):
        start_service(full, SECRET, 1, 1, tls_cert=tmp_path / "junk.pem", tls_key=tmp_path / "b.key")


def test_info_refuses_a_body_and_shows_a_client_only_its_own_counts(service):
    """F7. Before: Info accepted (and ignored) any body, and every token holder saw the service-wide
    request, error and compute counts. Now a client sees its own; the operator's key
    (`OPERATOR_KEY`) sees the service's."""
    assert _raw(service.url, "Info", b"\0" * (512 << 10), _auth())[:2] == (C.INVALID_ARGUMENT, "unexpected_body")
    from fellrec_flwr.split.auth import OPERATOR_KEY

    t = _tensors(1, 3)
    _client(service.url, key="alice").forward(t["hidden"], None, t["position_ids"])
    _raw(service.url, "Forward", b"junk", _auth("alice"))  # one error for alice
    mine = json.loads(_raw(service.url, "Info", metadata=_auth("nosy-bob"))[1])
    assert mine["stats_scope"] == "client"
    assert mine["stats"]["requests"] == 1 and mine["stats"]["errors"] == 0 and mine["stats"]["compute_s"] == 0
    alice = json.loads(_raw(service.url, "Info", metadata=_auth("alice"))[1])["stats"]
    assert alice["requests"] == 3 and alice["errors"] == 1 and alice["compute_s"] > 0
    whole = json.loads(_raw(service.url, "Info", metadata=_auth(OPERATOR_KEY))[1])
    assert whole["stats_scope"] == "service" and whole["stats"]["requests"] > alice["requests"]
    assert whole["stats"]["compute_s"] >= alice["compute_s"]


def test_a_secret_file_readable_by_others_is_refused(tmp_path, capsys):
    """F8. Before: only deploy/start_split_service.sh refused a 0644 secret; the service's own
    command line (and the token-issuing command) read it."""
    from fellrec_flwr.split.auth import AuthError, load_secret
    from fellrec_flwr.split.auth import main as auth_main

    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET + b"\n")
    for mode in (0o644, 0o640, 0o604):
        secret.chmod(mode)
        with pytest.raises(AuthError, match="chmod 600"):
            load_secret(secret)
    err = _cli_error(capsys, ["--model", str(tmp_path / "none"), "--secret-file", str(secret)])
    assert "mode 604" in err and "chmod 600" in err
    with pytest.raises(AuthError):
        auth_main(["issue", "--secret-file", str(secret), "--client-key", "node-1"])
    secret.chmod(0o600)
    assert load_secret(secret) == SECRET


# -- Medium 4: checkpoints -------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_types(tmp_path):
    import random

    rng = random.Random(3)
    state = {"rng_state": rng.getstate(), "node_to_key": {123456789012: 0, 7: 1}, "global": {"w": np.ones((2, 3))},
             "best_index": {0: 0}, "best_loss": float("inf"), "nested": [{"a": (1, "x")}, np.float32(2.5)],
             "empty": np.zeros((0, 4), np.float32), "flag": True, "$odd": 1}
    save_checkpoint(tmp_path, Checkpoint(round=3, strategy_state=state, global_arrays={"g": np.arange(4.0)},
                                         metric_rows=[{"round": 1, "loss": 0.5}], config={"seed": 1}))
    ckpt = load_checkpoint(tmp_path)
    got = ckpt.strategy_state
    assert ckpt.round == 3 and ckpt.config == {"seed": 1} and ckpt.metric_rows == [{"round": 1, "loss": 0.5}]
    random.Random().setstate(got["rng_state"])  # a tuple again, as setstate needs
    assert got["rng_state"] == rng.getstate()
    assert got["node_to_key"] == {123456789012: 0, 7: 1} and got["best_index"] == {0: 0}
    np.testing.assert_array_equal(got["global"]["w"], np.ones((2, 3)))
    assert got["nested"] == [{"a": (1, "x")}, 2.5] and got["empty"].shape == (0, 4) and got["$odd"] == 1
    np.testing.assert_array_equal(ckpt.global_arrays["g"], np.arange(4.0))


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_resume_refuses_a_pickle_and_anything_not_ours(tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pkl").write_bytes(pickle.dumps({"format": 1, "x": _Boom()}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(run / "checkpoint.pkl")
    assert not (tmp_path / "pwned").exists()
    from safetensors.numpy import save_file

    save_file({"x": np.ones(2)}, str(run / "checkpoint.safetensors"))
    with pytest.raises(CheckpointError, match="not a FELLRec checkpoint"):
        load_checkpoint(run)
    save_file({"x": np.ones(2)}, str(run / "checkpoint.safetensors"),
              metadata={"format": "fellrec-checkpoint", "version": "99"})
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(run)
    (run / "checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(run)


_READ_PATH_FILES = ["fellrec_flwr", "server_app", "client_app", "strategies", "data_prep"]


def test_no_pickle_torch_load_or_eval_on_any_read_path():
    """No code path the app runs may unpickle, torch.load without weights_only=True, or eval."""
    offenders = []
    for top in _READ_PATH_FILES:
        for path in sorted((ROOT / top).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bdill\b|\bjoblib\.load\b", code):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
                if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
                if re.search(r"(?<![\w.])eval\(|\bexec\(", code):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
                if re.search(r"allow_pickle\s*=\s*True", code):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


# -- Low 17: run-name ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../up", "a/b", "..", ".hidden", "x\\y"])
def test_run_name_must_be_a_plain_name(name):
    with pytest.raises(ConfigError, match="plain folder name"):
        from_run_config({"run-name": name})


def test_plain_run_names_are_accepted():
    assert from_run_config({"run-name": "fellrec-games_s1.v2"}).run_name == "fellrec-games_s1.v2"
    assert from_run_config({"run-name": "fellrec+-s2024"}).run_name == "fellrec+-s2024"  # strategy names have "+"


# -- High 1: the SuperLink's Control API is not reachable from client machines ----------------------


def _listening(port: int) -> set[str]:
    """Local addresses listening on TCP `port` (IPv4 and IPv6), from /proc/net/tcp*."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                if len(addr) == 8:
                    found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.add("::" if set(addr) == {"0"} else addr)
    return found


def _outward_address() -> str | None:
    """This machine's address on a non-loopback interface (what another machine would connect to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent: this only picks the route
            addr = probe.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")
def test_control_api_listens_on_loopback_only_and_the_public_port_serves_only_fleet(tmp_path):
    import shutil as _shutil
    import ssl

    if not (_shutil.which("openssl") and _shutil.which("ssh-keygen")):
        pytest.skip("the deploy scripts need openssl and ssh-keygen")
    from deploy_helpers import Cluster

    cluster = Cluster(tmp_path, num_nodes=1, bind_host="0.0.0.0")  # the documented multi-machine layout
    cluster.script("make_certs.sh")
    cluster.script("write_connection.sh")
    try:
        cluster.start_superlink()
        assert _listening(cluster.control_port) == {"127.0.0.1"}
        assert "0.0.0.0" in _listening(cluster.superlink_port)
        outward = _outward_address()
        if outward:  # as another machine would: the Control API refuses, the Fleet port answers
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outward, cluster.control_port), timeout=5).close()
            socket.create_connection((outward, cluster.superlink_port), timeout=5).close()
        ctx = ssl.create_default_context(cafile=str(cluster.deploy_dir / "certs" / "ca.crt"))

        def post(path: str) -> tuple[int, bytes]:
            conn = http.client.HTTPSConnection("127.0.0.1", cluster.superlink_port, timeout=30, context=ctx)
            try:
                conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/acquire-task", "/docs",
                     "/v1/fleet/../control/list-runs"):
            status, body = post(path)
            assert status == 404 and b"Fleet API only" in body, (path, status, body[:200])
        status, body = post("/v1/fleet/get-run")  # forwarded: the SuperLink itself answers
        assert b"Fleet API only" not in body, (status, body[:200])
        # the operator's CLI on the server still reaches the Control API (loopback)
        out = cluster.flwr("list", cluster.connection, "--format", "json")
        assert out.returncode == 0 and '"runs"' in out.stdout, out.stdout + out.stderr
        assert "127.0.0.1:%d" % cluster.control_port in (cluster.root / "flwr-home" / "config.toml").read_text()
    finally:
        cluster.stop_all()
        assert cluster.leftovers() == []


# -- Low 18: key handling the scripts follow ------------------------------------------------------


def _gateway_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fleet_gateway", ROOT / "deploy" / "fleet_gateway.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Served:
    """A uvicorn server in a thread of this process, for as long as the `with` lasts."""

    def __init__(self, config):
        import uvicorn

        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def _counting_upstream(received: list[int]):
    """A stand-in SuperLink that reads each body as it arrives and notes its size."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response
    from starlette.routing import Route

    async def fleet(request):
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
        except ClientDisconnect:  # the gateway cut the body short
            received.append(size)
            return Response(b"", status_code=400)
        received.append(size)
        return Response(b"ok:" + str(size).encode())

    app = Starlette(routes=[Route("/v1/fleet/{name}", fleet, methods=["POST"])])
    return uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")


def _port_of(served: _Served) -> int:
    return served.server.servers[0].sockets[0].getsockname()[1]


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_the_gateway_caps_a_body_however_framed_streams_it_and_bounds_connections():
    """Issue 24, F3. Before: the 413 check read only Content-Length, so a chunked body of any size
    went through, buffered whole in the gateway (and in the SuperLink); connections were unbounded.
    Now the body is streamed to the SuperLink as it arrives and cut once it passes --max-body-mb
    however framed, a request must finish within --request-timeout, and connections beyond
    --max-connections get 503."""
    gateway = _gateway_module()
    received: list[int] = []
    with _Served(_counting_upstream(received)) as upstream:
        config = gateway.server_config(["--listen", "127.0.0.1:0", "--upstream",
                                        f"http://127.0.0.1:{_port_of(upstream)}", "--max-body-mb", "16",
                                        "--request-timeout", "2", "--max-connections", "3"])
        config.log_level = "warning"
        with _Served(config) as served:
            port = _port_of(served)

            def post(chunks, chunked=True):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
                try:
                    conn.request("POST", "/v1/fleet/push-messages", body=chunks, encode_chunked=chunked,
                                 headers={"Transfer-Encoding": "chunked"} if chunked else {})
                    reply = conn.getresponse()
                    return reply.status, reply.read()
                except (BrokenPipeError, ConnectionResetError):  # cut while sending: read what was answered
                    reply = conn.getresponse()
                    return reply.status, reply.read()
                finally:
                    conn.close()

            block = b"x" * (1 << 20)
            # under the cap, chunked: passes, streamed (RSS grows far less than the 12 MB body)
            rss = _rss_mb()
            assert post(iter([block] * 12)) == (200, b"ok:" + str(12 << 20).encode())
            streamed_rise = _rss_mb() - rss
            # over the cap, chunked (no Content-Length): 413, and the SuperLink never gets a whole body
            status, _ = post(iter([block] * 40))
            assert status == 413
            assert all(size <= 16 << 20 for size in received[1:]), received
            # over the cap with Content-Length: 413 before anything is read
            status, _ = post(block * 17, chunked=False)
            assert status == 413
            # a sender that stalls is answered 408 after --request-timeout
            def stalling():
                yield block
                time.sleep(3)
                yield block
            assert post(stalling())[0] == 408
            # three connections held open by slow uploads; a request on a fourth gets 503
            held = []
            for _ in range(3):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"POST /v1/fleet/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
                held.append(sock)
            time.sleep(0.3)
            try:
                assert post(iter([b"y"]))[0] == 503
            finally:
                for sock in held:
                    sock.close()
            print(f"\ngateway: a 12 MB chunked body forwarded with RSS +{streamed_rise:.0f} MB")


def test_scripts_keep_the_ca_key_apart_and_every_secret_owner_only(tmp_path):
    import shutil as _shutil

    if not (_shutil.which("openssl") and _shutil.which("ssh-keygen")):
        pytest.skip("the deploy scripts need openssl and ssh-keygen")
    from deploy_helpers import Cluster

    cluster = Cluster(tmp_path, num_nodes=1)
    old = os.umask(0o022)  # a typical login umask: the scripts must not depend on the caller's
    try:
        cluster.script("make_certs.sh")
        cluster.script("make_node_keys.sh", "1")
        cluster.script("make_split_credentials.sh", "1")
    finally:
        os.umask(old)
    d = cluster.deploy_dir
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert not (d / "certs" / "ca.key").exists()  # not beside the server's files
    assert mode(d / "ca-private") == 0o700 and mode(d / "ca-private" / "ca.key") == 0o600
    assert mode(d / "certs" / "server.key") == 0o600 and mode(d / "certs" / "ca.crt") == 0o644
    assert mode(d / "keys" / "sn0") == 0o600 and mode(d / "keys" / "sn0.pub") == 0o644
    assert mode(d / "split" / "secret.txt") == 0o600 and mode(d / "split" / "tokens" / "client-0.token") == 0o600
    assert mode(d / "split") == mode(d / "split" / "tokens") == 0o700
    # re-issuing the server certificate works with the CA key where the admin keeps it
    offline = tmp_path / "usb"
    _shutil.move(str(d / "ca-private"), offline)
    assert cluster.script("make_certs.sh", check=False).returncode == 2  # no CA key: refuses, clearly
    cluster.script("make_certs.sh", CA_DIR=str(offline))


# -- Low 15: each client machine gets only its own partition ----------------------------------------


def test_a_client_partition_export_holds_only_that_clients_rows(tmp_path):
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        from export_partition import ExportError, export_partition
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    from data_prep.prepare import prepare
    from fellrec_flwr.data.prepared import PreparedData

    cfg = from_run_config({"min-clients": 3, "data.num-clients": 3, "data.train-samples": 48,
                           "data.valid-users": 30, "data.test-users": 30, "data.bpr-epochs": 2})
    source = PreparedData.load(prepare(cfg.data, tmp_path / "cache", seed=cfg.seed, progress=False))
    (source.path / "notes-about-users.txt").write_text("anything unknown stays on the server")
    out = export_partition(source.path, 1, tmp_path / "client-1")
    part = PreparedData.load(out)
    for name in ("train", "valid", "test"):
        assert set(part.split_frame(name)["client"]) == {1}
        assert part.split(name, 1) == source.split(name, 1)
    assert part.sequences() == source.sequences(1)
    mine = set(source.sequences(1)) | {e.user_id for n in ("train", "valid", "test") for e in source.split(n, 1)}
    assert set(part.original_user_ids) == mine  # only this client's users
    assert not (out / "notes-about-users.txt").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in out.iterdir() if f.is_file())
    with pytest.raises(ExportError, match="out of range"):
        export_partition(source.path, 3, tmp_path / "client-3")
