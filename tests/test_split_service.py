"""The split service: authentication, validation of malformed requests, session ownership and
limits, concurrent clients, a restart during training, TLS, and the command line."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fellrec_flwr.split.plan import plan_for_model, save_full_model
from fellrec_flwr.split.auth import issue_token, write_secret
from fellrec_flwr.split.client import (
    SplitServiceClient, SplitServiceError, SplitServiceUnavailable, make_split_model,
)
from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer
from fellrec_flwr.split.wire import ERROR_CODE_KEY, encode, method_path
from server_app.split_service import ServiceLimits, start_service

SECRET = b"test-secret-0123456789abcdef"
TITLES = ["Super Mario Odyssey", "The Legend of Zelda", "Halo 3", "Call of Duty", "Minecraft",
          "Grand Theft Auto V", "Mario Kart 8", "Final Fantasy VII"]
H = 64  # the tiny model's hidden size
LIMITS = ServiceLimits(max_body_bytes=1 << 20, max_batch=8, max_seq=64, max_tokens=256,
                       session_cache_bytes=1 << 20, max_sessions_per_client=4)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TITLES * 3, 400, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def full(tok):
    return build_tiny_model(tok, hidden=H, layers=4, heads=4, seed=0).eval()


@pytest.fixture(scope="module")
def service(full):
    handle = start_service(full, SECRET, 1, 1, limits=LIMITS)
    yield handle
    handle.stop()


def _client(url, key="client-0", **kw):
    return SplitServiceClient(url, key, issue_token(SECRET, key), **kw)


def _auth(key="client-0"):
    return (("x-client-key", key), ("x-client-token", issue_token(SECRET, key)))


C = grpc.StatusCode


def _raw(url, method, body=b"", metadata=None):
    """One call on a fresh channel, no retries: (C.OK, reply bytes) or (gRPC code, engine code, message)."""
    with grpc.insecure_channel(urlsplit(url).netloc, options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            return C.OK, channel.unary_unary(method_path(method))(body, metadata=metadata, timeout=30)
        except grpc.RpcError as err:
            return err.code(), dict(err.trailing_metadata() or ()).get(ERROR_CODE_KEY), err.details()


def _good(b=2, q=5, **override):
    tensors = {"hidden": torch.randn(b, q, H), "position_ids": torch.arange(q, dtype=torch.int32)[None],
               "attention_mask": torch.ones(b, q, dtype=torch.bool)}
    tensors.update(override)
    return {k: v for k, v in tensors.items() if v is not None}


def _assert_serves(url):
    """A correct request still gets a correct answer."""
    client = _client(url)
    t = _good()
    out, _ = client.forward(t["hidden"], t["attention_mask"], t["position_ids"])
    assert out.shape == (2, 5, H) and torch.isfinite(out).all()


# -- authentication ----------------------------------------------------------------------


def test_health_is_open_and_info_needs_credentials(service):
    code, reply = _raw(service.url, "Health")
    assert code == C.OK and json.loads(reply) == {"status": "ok"}
    assert _raw(service.url, "Info")[:2] == (C.UNAUTHENTICATED, "missing_credentials")
    code, reply = _raw(service.url, "Info", metadata=_auth())
    info = json.loads(reply)
    assert code == C.OK and info["hidden_size"] == H and info["server_layers"] == [1, 2]


@pytest.mark.parametrize("metadata,status,code", [
    ((), C.UNAUTHENTICATED, "missing_credentials"),
    ((("x-client-key", "client-0"),), C.UNAUTHENTICATED, "missing_credentials"),
    ((("x-client-key", "client-0"), ("x-client-token", "0" * 64)), C.PERMISSION_DENIED, "bad_credentials"),
    ((("x-client-key", "client-1"), ("x-client-token", issue_token(SECRET, "client-0"))), C.PERMISSION_DENIED,
     "bad_credentials"),
    ((("x-client-key", "client-0"), ("x-client-token", issue_token(b"another-secret-0123456", "client-0"))),
     C.PERMISSION_DENIED, "bad_credentials"),
    ((("x-client-key", "bad key with spaces"), ("x-client-token", "x")), C.PERMISSION_DENIED, "bad_credentials"),
])
def test_unauthenticated_requests_are_refused(service, metadata, status, code):
    computed = service.service.stats["compute_s"]
    got = _raw(service.url, "Forward", encode(_good()), metadata)
    assert got[:2] == (status, code)
    assert service.service.stats["compute_s"] == computed  # refused before any compute
    _assert_serves(service.url)


def test_client_with_wrong_token_raises(service):
    client = SplitServiceClient(service.url, "client-0", "f" * 64)
    with pytest.raises(SplitServiceError) as err:
        client.info()
    assert err.value.status == 403 and err.value.code == "bad_credentials"


# -- malformed requests ---------------------------------------------------------------


def _session_of(url, key):
    t = _good(1, 3, attention_mask=None)
    _, sid = _client(url, key).infer_step("", t["hidden"], None, t["position_ids"], 0)
    return sid


def _infer(sid, past=0, **tensors):
    return encode(_good(1, 3, **tensors), {"session": sid, "past_len": str(past)})


def _cases(url):
    own = _session_of(url, "client-0")
    other = _session_of(url, "client-9")
    fwd, bwd, step = "Forward", "Backward", "InferStep"
    g = _good()
    valid = encode(g)
    return [
        # (name, method, request, gRPC status, engine code; None: refused by the gRPC library itself)
        ("unknown method", "Nothing", valid, C.UNIMPLEMENTED, None),
        ("oversized message", fwd, b"\0" * (2 << 20), C.RESOURCE_EXHAUSTED, None),
        ("Info with a body", "Info", b"x", C.INVALID_ARGUMENT, "unexpected_body"),
        ("garbage body", fwd, b"\x00\x01garbage-not-safetensors", C.INVALID_ARGUMENT, "bad_body"),
        ("empty body", fwd, b"", C.INVALID_ARGUMENT, "bad_body"),
        ("truncated bytes", fwd, valid[: len(valid) - 100], C.INVALID_ARGUMENT, "bad_body"),
        ("truncated header", fwd, valid[:20], C.INVALID_ARGUMENT, "bad_body"),
        ("header is not JSON", fwd, (12).to_bytes(8, "little") + b"{not json!!}", C.INVALID_ARGUMENT, "bad_body"),
        ("missing hidden", fwd, encode({"position_ids": g["position_ids"]}), C.INVALID_ARGUMENT,
         "missing_tensor"),
        ("unexpected tensor", fwd, encode({**g, "input_ids": torch.ones(2, 5, dtype=torch.int64)}),
         C.INVALID_ARGUMENT, "unexpected_tensor"),
        ("int64 hidden", fwd, encode(_good(hidden=torch.ones(2, 5, H, dtype=torch.int64))), C.INVALID_ARGUMENT,
         "bad_dtype"),
        ("float64 hidden", fwd, encode(_good(hidden=torch.randn(2, 5, H, dtype=torch.float64))), C.INVALID_ARGUMENT,
         "bad_dtype"),
        ("float mask", fwd, encode(_good(attention_mask=torch.ones(2, 5))), C.INVALID_ARGUMENT, "bad_dtype"),
        ("float position ids", fwd, encode(_good(position_ids=torch.zeros(1, 5))), C.INVALID_ARGUMENT,
         "bad_dtype"),
        ("rank-2 hidden", fwd, encode(_good(hidden=torch.randn(5, H))), C.INVALID_ARGUMENT, "bad_shape"),
        ("empty sequence", fwd, encode(_good(2, 0)), C.INVALID_ARGUMENT, "bad_shape"),
        ("wrong hidden size", fwd, encode(_good(hidden=torch.randn(2, 5, H + 1))), C.INVALID_ARGUMENT,
         "bad_hidden_size"),
        ("NaN", fwd, encode(_good(hidden=torch.full((2, 5, H), float("nan")))), C.INVALID_ARGUMENT,
         "non_finite"),
        ("inf", fwd, encode(_good(hidden=torch.full((2, 5, H), float("inf")))), C.INVALID_ARGUMENT,
         "non_finite"),
        ("huge batch", fwd, encode(_good(9, 2)), C.RESOURCE_EXHAUSTED, "batch_too_large"),
        ("long sequence", fwd, encode(_good(1, 65)), C.RESOURCE_EXHAUSTED, "sequence_too_long"),
        ("too many tokens", fwd, encode(_good(8, 40)), C.RESOURCE_EXHAUSTED, "too_many_tokens"),
        ("mask shape", fwd, encode(_good(attention_mask=torch.ones(2, 6, dtype=torch.bool))), C.INVALID_ARGUMENT,
         "bad_attention_mask"),
        ("position ids shape", fwd, encode(_good(position_ids=torch.zeros(3, 5, dtype=torch.int32))),
         C.INVALID_ARGUMENT, "bad_position_ids"),
        ("negative position", fwd, encode(_good(position_ids=torch.full((1, 5), -1, dtype=torch.int32))),
         C.INVALID_ARGUMENT, "position_out_of_range"),
        ("huge position", fwd, encode(_good(position_ids=torch.full((1, 5), 10**6, dtype=torch.int32))),
         C.INVALID_ARGUMENT, "position_out_of_range"),
        ("bad metadata flag", fwd, encode(g, {"keep_graph": "yes"}), C.INVALID_ARGUMENT, "bad_metadata"),
        ("unknown metadata", fwd, encode(g, {"labels": "1 2 3"}), C.INVALID_ARGUMENT, "bad_metadata"),
        ("missing grad", bwd, valid, C.INVALID_ARGUMENT, "missing_tensor"),
        ("wrong grad shape", bwd, encode({**g, "grad": torch.randn(2, 4, H)}), C.INVALID_ARGUMENT,
         "bad_grad_shape"),
        ("wrong grad dtype", bwd, encode({**g, "grad": torch.randn(2, 5, H).half()}), C.INVALID_ARGUMENT,
         "bad_grad_shape"),
        ("NaN grad", bwd, encode({**g, "grad": torch.full((2, 5, H), float("nan"))}), C.INVALID_ARGUMENT,
         "non_finite"),
        ("unknown session", step, _infer("no-such-session"), C.NOT_FOUND, "unknown_session"),
        ("other client's session", step, _infer(other), C.NOT_FOUND, "unknown_session"),
        ("session out of sync", step, _infer(own, past=7), C.FAILED_PRECONDITION,
         "session_out_of_sync"),
        # protocol v2: the mask covers the new tokens only, whatever the session already holds
        ("session mask length", step, _infer(own, past=3, attention_mask=torch.ones(1, 6, dtype=torch.bool)),
         C.INVALID_ARGUMENT, "bad_attention_mask"),
        ("bad past_len", step, encode(_good(1, 3), {"session": own, "past_len": "x"}), C.INVALID_ARGUMENT,
         "bad_metadata"),
        ("beam index out of range", step,
         encode({**_good(1, 3), "beam_idx": torch.tensor([5], dtype=torch.int32)}, {"session": "", "past_len": "0"}),
         C.INVALID_ARGUMENT, "bad_beam_idx"),
        ("bad JSON", "InferCreate", b"{nope", C.INVALID_ARGUMENT, "bad_json"),
        ("bad JSON keys", "InferClose", b'{"sessions": "abc"}', C.INVALID_ARGUMENT, "bad_json"),
    ]


def test_malformed_requests_get_clear_errors(service):
    cases = _cases(service.url)
    assert len(cases) >= 20
    for name, method, body, status, code in cases:
        got = _raw(service.url, method, body, _auth())
        assert got[:2] == (status, code), (name, got)
        assert got[2] and "Traceback" not in got[2] and "File \"" not in got[2], (name, got)  # a clean message
        _assert_serves(service.url)
    assert _raw(service.url, "Health")[0] == C.OK


def test_other_clients_session_is_untouched(service):
    a, b = _client(service.url, "alice"), _client(service.url, "bob")
    t = _good(1, 3, attention_mask=None)
    _, sid = a.infer_step("", t["hidden"], None, t["position_ids"], 0)
    with pytest.raises(SplitServiceError) as err:
        b.infer_step(sid, torch.randn(1, 1, H), None, torch.tensor([[3]], dtype=torch.int32), 3)
    assert err.value.status == 404 and err.value.code == "unknown_session"
    b.close_later(sid)
    b.flush_closes()  # closing someone else's session does nothing
    out, same = a.infer_step(sid, torch.randn(1, 1, H), None, torch.tensor([[3]], dtype=torch.int32), 3)
    assert same == sid and out.shape == (1, 1, H)


def test_sessions_expire_and_are_capped(full):
    limits = ServiceLimits(session_ttl_s=0.3, max_sessions_per_client=2)
    handle = start_service(full, SECRET, 1, 1, limits=limits)
    try:
        client = _client(handle.url)
        t = _good(1, 3, attention_mask=None)
        sids = [client.infer_step("", t["hidden"], None, t["position_ids"], 0)[1] for _ in range(3)]
        assert handle.service.session_count() == 2  # the oldest of this client's sessions was dropped
        with pytest.raises(SplitServiceError, match="unknown_session"):
            client.infer_step(sids[0], torch.randn(1, 1, H), None, torch.tensor([[3]], dtype=torch.int32), 3)
        time.sleep(0.4)
        with pytest.raises(SplitServiceError, match="unknown_session"):
            client.infer_step(sids[2], torch.randn(1, 1, H), None, torch.tensor([[3]], dtype=torch.int32), 3)
    finally:
        handle.stop()
    small = start_service(full, SECRET, 1, 1, limits=ServiceLimits(session_cache_bytes=4000))
    try:  # a 3-token session of 2 layers x K,V x 64 floats = 3 KB; a second one evicts the first
        client = _client(small.url)
        t = _good(1, 3, attention_mask=None)
        client.infer_step("", t["hidden"], None, t["position_ids"], 0)
        client.infer_step("", t["hidden"], None, t["position_ids"], 0)
        assert small.service.session_count() == 1
        with pytest.raises(SplitServiceError) as err:
            big = _good(1, 8, attention_mask=None)
            client.infer_step("", big["hidden"], None, big["position_ids"], 0)
        # refused before any compute (hardening finding 3): 413 with the quota named
        assert err.value.status == 413 and err.value.code == "session_too_large"
        assert "quota" in str(err.value)
    finally:
        small.stop()


# -- many clients ------------------------------------------------------------------------


def test_concurrent_clients_get_their_own_answers(service):
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            gen = torch.Generator().manual_seed(i)
            client = _client(service.url, f"client-{i}")
            for step in range(3):
                b, q = 1 + (i + step) % 3, 2 + i
                hidden = torch.randn(b, q, H, generator=gen)
                mask = torch.ones(b, q, dtype=torch.bool)
                mask[0, 0] = False
                pos = torch.arange(q, dtype=torch.int32)[None]
                out, _ = client.forward(hidden, mask, pos)
                results[(i, step)] = (hidden, mask, pos, out)
        except BaseException as err:  # noqa: BLE001 — reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 15
    body = service.service.body
    for hidden, mask, pos, out in results.values():
        with torch.no_grad():
            want = body(hidden, mask, pos.long())
        assert torch.allclose(out, want, atol=1e-5)


# -- a restart during training ------------------------------------------------------------


def _train(model, batch, steps, on_step=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        if on_step:
            on_step(step)
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_service_restart_during_training_is_survived(full, tok):
    plan = plan_for_model(full, 1, 1)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      layers_to_transform=plan.client_layers, task_type="CAUSAL_LM")
    batch = tok(TITLES[:4], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    ref = get_peft_model(copy.deepcopy(full), lora)
    want = _train(ref, batch, 5)

    handle = {"h": start_service(full, SECRET, 1, 1)}
    port = handle["h"].port
    torch.manual_seed(0)
    client = _client(handle["h"].url, retries=8, backoff=0.1)
    split = make_split_model(get_peft_model(copy.deepcopy(full), lora), plan, client)

    def restart_at_step_2(step: int) -> None:
        if step == 2:
            handle["h"].stop()  # the service goes away ...
            threading.Timer(0.5, lambda: handle.update(h=start_service(full, SECRET, 1, 1, port=port))).start()

    try:
        got = _train(split, batch, 5, restart_at_step_2)  # ... and comes back on the same port
    finally:
        time.sleep(0.6)
        handle["h"].stop()
    assert client.stats["retries"] >= 1
    assert got == pytest.approx(want, abs=1e-4)  # stateless middle: training is unaffected
    for (n, p), (_, q) in zip(ref.named_parameters(), split.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-4), n


def test_unreachable_service_gives_up_after_retries():
    client = SplitServiceClient("http://127.0.0.1:9", "client-0", "x", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(SplitServiceUnavailable, match="after 3 attempts"):
        client.health()


# -- TLS and the command line ------------------------------------------------------------


def test_tls(full, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    handle = start_service(full, SECRET, 1, 1, tls_cert=cert, tls_key=key)
    try:
        assert handle.url.startswith("https://")
        client = _client(handle.url, ca_file=cert)
        assert client.info()["hidden_size"] == H
        _assert_serves_client(client)
        untrusted = _client(handle.url, retries=0)  # the system store does not know the self-signed cert
        with pytest.raises(SplitServiceUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.info()
    finally:
        handle.stop()


def _assert_serves_client(client):
    t = _good()
    out, _ = client.forward(t["hidden"], t["attention_mask"], t["position_ids"])
    assert out.shape == (2, 5, H)


def test_command_line_service(full, tok, tmp_path):
    folder = save_full_model(full, tmp_path / "full", tok)
    secret_file = tmp_path / "secret.txt"
    write_secret(secret_file, SECRET)
    proc = subprocess.Popen([sys.executable, "-m", "server_app.split_service", "--model", str(folder), "--front-k", "1",
                             "--back-k", "2", "--port", "0", "--secret-file", str(secret_file), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split("listening on ")[1].split()[0]
        client = _client(url)
        assert client.info()["server_layers"] == [1, 1]
        split = make_split_model(copy.deepcopy(full), plan_for_model(full, 1, 2), client)
        batch = tok(TITLES[:3], return_tensors="pt", padding=True)
        with torch.no_grad():
            a, b = full(**batch).logits, split(**batch).logits
        real = batch["attention_mask"].bool()
        assert torch.allclose(a[real], b[real], atol=1e-4)
    finally:
        proc.terminate()
        proc.wait(20)

def test_command_line_rejects_a_bad_cut(full, tok, tmp_path, capsys):
    from server_app.split_service import main

    folder = save_full_model(full, tmp_path / "full", tok)
    secret_file = tmp_path / "secret.txt"
    write_secret(secret_file, SECRET)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(folder), "--front-k", "2", "--back-k", "2", "--secret-file", str(secret_file)])
    assert exit_.value.code == 2 and "leaves no layer for the server" in capsys.readouterr().err


def test_calls_are_logged_at_debug_with_the_client_key(service, caplog):
    """The access log (the deploy test waits for it to see a client at work); keys repr-escaped."""
    caplog.set_level("DEBUG", logger="fellrec.split_service")
    _assert_serves(service.url)
    assert any(r.getMessage().startswith("call Forward from 'client-0'") for r in caplog.records), caplog.text
