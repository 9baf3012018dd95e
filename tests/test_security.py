"""Hardening (issue 15): one regression test per finding the attacker / careless-client probes
found. Each test fails on the code before the fix. The deploy-level findings (1, 15's README, 18)
are covered in test_deploy.py / test_security's deploy section; see docs/security.md for the map.
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

from conftest import ROOT
from fellrec_flwr import atomic
from fellrec_flwr.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fellrec_flwr.config import ConfigError, from_run_config
from fellrec_flwr.split.plan import SplitError
from fellrec_flwr.split.auth import issue_token, write_secret
from fellrec_flwr.split.client import SplitServiceClient, SplitServiceError
from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer
from fellrec_flwr.split.wire import encode
from server_app import split_service
from server_app.split_service import ServiceLimits, SplitService, make_body, start_service

SECRET = b"test-secret-0123456789abcdef"
TITLES = ["Super Mario Odyssey", "The Legend of Zelda", "Halo 3", "Minecraft", "Mario Kart 8"]
H = 64


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
    return {"X-Client-Key": key, "X-Client-Token": issue_token(SECRET, key)}


def _tensors(b=2, q=5):
    return {"hidden": torch.randn(b, q, H), "position_ids": torch.arange(q, dtype=torch.int32)[None]}


def _raw_bytes(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send exactly `request` on a fresh connection; the whole answer (until the server closes)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def _post(url, path, body, headers=None):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={**_auth(), **(headers or {}),
                                                      "Content-Length": str(len(body))})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(data) if data[:1] == b"{" else data


# -- High 2: kept graphs ----------------------------------------------------------------------------


def test_an_evicted_kept_graph_frees_its_saved_tensors(full, monkeypatch):
    """The saved-tensor hook used to return the tensor itself: a saved output then referenced its
    own autograd node, a cycle through C++ that not even the garbage collector frees, so every
    kept graph leaked its activations after eviction."""
    service = SplitService(make_body(full, 1, 1), SECRET, ServiceLimits(activation_cache_bytes=64 << 20))
    packed = []
    real_pack = split_service._SavedBytes.pack

    def spy(self, x):
        saved = real_pack(self, x)
        if x.untyped_storage().data_ptr() not in self.param_ptrs:  # weights stay alive anyway
            packed.append(weakref.ref(saved))
        return saved

    monkeypatch.setattr(split_service._SavedBytes, "pack", spy)
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
    from server_app.split_service import ServiceLimits, SplitService, make_body
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
                           max_tokens=4096, max_batch=16, session_evict_idle_s=3600)
    handle = start_service(full, SECRET, 1, 1, limits=limits)
    try:
        alice, bob = _client(handle.url, "alice", retries=0), _client(handle.url, "bob", retries=0)
        _, sid = _step(alice, "", 1, 4, 0)
        with pytest.raises(SplitServiceError) as err:
            _step(bob, "", 4, 8, 0)  # 32 KB > bob's 16 KB quota
        assert err.value.status == 413 and err.value.code == "session_too_large"
        assert "quota" in str(err.value)
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


def test_tcp_nodelay_on_both_ends_and_no_delayed_ack_stall(service):
    client = _client(service.url)
    _, sid = _step(client, "", 1, 2, 0)
    conn = client._local.conn
    assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    server_side = list(service._server._connections)
    assert server_side and all(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in server_side)
    times = []
    for i in range(2, 22):
        start = time.perf_counter()
        _, sid = _step(client, sid, 1, 1, i)
        times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 0.030  # Nagle + delayed ACK: >= 40 ms per request
    client.close()


# -- Medium 6: the token only over https ----------------------------------------------------------


def test_token_is_not_sent_over_plain_http_to_another_machine_or_with_a_ca(tmp_path):
    with pytest.raises(SplitError, match="in clear"):
        SplitServiceClient("http://10.0.0.5:8470", "client-0", "t")
    with pytest.raises(SplitError, match="CA file is configured"):
        SplitServiceClient("http://127.0.0.1:8470", "client-0", "t", ca_file=tmp_path / "ca.crt")
    SplitServiceClient("http://10.0.0.5:8470", "client-0", "t", allow_insecure_http=True)  # the dev flag
    SplitServiceClient("http://127.0.0.1:8470", "client-0", "t")  # loopback: nothing leaves the machine
    SplitServiceClient("https://fl.example.org:8470", "client-0", "t")


class _Recorder(BaseHTTPRequestHandler):
    seen: list = []
    location = ""

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("X-Client-Token")))
        self.send_response(302 if self.location else 200)
        if self.location:
            self.send_header("Location", self.location)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_GET

    def log_message(self, *args):
        pass


def _serve(handler):
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_redirect_is_never_followed_with_the_token():
    target = _serve(type("Target", (_Recorder,), {"seen": [], "location": ""}))
    bounce = _serve(type("Bounce", (_Recorder,), {"seen": [],
                                                   "location": f"http://127.0.0.1:{target.server_port}/v1/info"}))
    try:
        client = SplitServiceClient(f"http://127.0.0.1:{bounce.server_port}", "client-0", "secret-token", retries=0)
        with pytest.raises(SplitServiceError) as err:
            client.info()
        assert err.value.status == 302 and err.value.code == "redirect_refused"
        assert target.RequestHandlerClass.seen == []
    finally:
        bounce.shutdown()
        target.shutdown()


# -- Low 7: no internals in a 500, no retry; malformed headers are 400 ------------------------------


def test_an_internal_error_leaks_nothing_and_is_not_retried(service, monkeypatch):
    calls = []

    def broken(self, client, data):
        calls.append(1)
        raise RuntimeError("secret internals at /srv/model/weights.bin")

    monkeypatch.setitem(split_service._POST_ROUTES, "/v1/forward", broken)
    status, body = _post(service.url, "/v1/forward", encode(_tensors()))
    assert status == 500 and body["error"]["code"] == "internal_error"
    assert "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    calls.clear()
    with pytest.raises(SplitServiceError) as err:
        _client(service.url, backoff=0.01).forward(**{"hidden": torch.randn(2, 5, H), "attention_mask": None,
                                                      "position_ids": torch.arange(5, dtype=torch.int32)[None]})
    assert err.value.status == 500 and len(calls) == 1  # not retried


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
def test_malformed_headers_get_400_not_500(service, name, body):
    status, reply = _post(service.url, "/v1/forward", body)
    assert status == 400 and reply["error"]["code"] == "bad_body", (name, status, reply)


def test_deeply_nested_json_gets_400(service):
    status, reply = _post(service.url, "/v1/infer/close", b'{"sessions": ' + b"[" * 20000 + b"]" * 20000 + b"}")
    assert status == 400 and reply["error"]["code"] == "bad_json"


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


# -- Low 9, 10, 11, 13: the HTTP layer ------------------------------------------------------------


def test_folded_headers_are_rejected(service):
    reply = _raw_bytes(service.url, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Client-Key: client-0\r\n"
                                    b" injected log line\r\nContent-Length: 0\r\n\r\n")
    assert _status(reply) == 400 and b"bad_header" in reply


def test_get_with_a_body_is_rejected(service):
    reply = _raw_bytes(service.url, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert _status(reply) == 400 and b"unexpected_body" in reply
    reply = _raw_bytes(service.url, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"5\r\nhello\r\n0\r\n\r\n")
    assert _status(reply) == 400


def test_a_slow_drip_request_is_cut_at_the_deadline(full):
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(request_timeout_s=1.0, socket_timeout_s=30))
    try:
        parts = urlsplit(handle.url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            head = "".join(f"{k}: {v}\r\n" for k, v in _auth().items())
            sock.sendall(f"POST /v1/forward HTTP/1.1\r\nHost: x\r\n{head}Content-Length: 1000\r\n\r\n".encode())
            start = time.monotonic()
            closed = False
            while time.monotonic() - start < 8:
                try:
                    sock.sendall(b"x")
                    if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                        closed = True
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    closed = True
                    break
                time.sleep(0.2)
            elapsed = time.monotonic() - start
        assert closed and elapsed < 4, f"the connection was still open after {elapsed:.1f} s"
    finally:
        handle.stop()


def test_the_deadline_does_not_cut_a_slow_compute(full, monkeypatch):
    """The deadline bounds what the client controls (sending, taking the reply), not the compute or
    the wait for the compute lock behind other clients."""
    def slow_create(self, client, data):
        time.sleep(1.5)
        return b'{"session": "x"}'

    monkeypatch.setitem(split_service._POST_ROUTES, "/v1/infer/create", slow_create)
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(request_timeout_s=0.5))
    try:
        status, reply = _post(handle.url, "/v1/infer/create", b"{}")
        assert status == 200 and reply == {"session": "x"}
    finally:
        handle.stop()


def test_listen_backlog_is_configurable_and_not_5(full):
    assert ServiceLimits().listen_backlog >= 128
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(listen_backlog=321))
    try:
        assert handle._server.request_queue_size == 321
        if Path("/proc/net/tcp").exists():
            ss = subprocess.run(["ss", "-ltnH", f"sport = :{handle.port}"], capture_output=True, text=True)
            if ss.returncode == 0 and ss.stdout.strip():
                assert ss.stdout.split()[2] == "321"  # Send-Q of a listening socket = its backlog
    finally:
        handle.stop()


# -- Low 12: limits before allocation -------------------------------------------------------------


def test_shapes_and_limits_are_checked_before_decoding(service, monkeypatch):
    decoded = []
    real = split_service.decode
    monkeypatch.setattr(split_service, "decode", lambda data: decoded.append(1) or real(data))
    status, reply = _post(service.url, "/v1/forward", encode(_tensors(9, 2)))  # batch 9 > 8
    assert status == 413 and reply["error"]["code"] == "batch_too_large"
    status, reply = _post(service.url, "/v1/forward", encode({"hidden": torch.randn(1, 2, H + 3),
                                                              "position_ids": torch.zeros(1, 2, dtype=torch.int32)}))
    assert status == 400 and reply["error"]["code"] == "bad_hidden_size"
    assert decoded == []
    assert _post(service.url, "/v1/forward", encode(_tensors()))[0] == 200 and decoded == [1]


# -- Low 14: health and info ----------------------------------------------------------------------


def test_health_answers_while_compute_runs_and_tells_nothing(service):
    release = threading.Event()
    holder = threading.Thread(target=lambda: (service.service._lock.acquire(), release.wait(),
                                              service.service._lock.release()))
    holder.start()
    try:
        time.sleep(0.1)
        parts = urlsplit(service.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3)
        conn.request("GET", "/v1/health")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
        conn.close()
    finally:
        release.set()
        holder.join()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3)
    conn.request("GET", "/v1/info")
    assert conn.getresponse().status == 401


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
