"""The split-inference service: the server-held middle layers for many clients, over gRPC.

    python -m server_app.split_service --model PATH|GGUF|tiny --front-k 1 --back-k 1 \\
        --secret-file secret.txt [--device cuda] [--port 8470] [--tls-cert c.pem --tls-key k.pem] \\
        [--host 0.0.0.0 (needs TLS, or --insecure)] [--max-message-mb N] [--read-timeout S]

A thin transport over the engine `fellrec_flwr.split.engine.SplitService`: gRPC service
`fellrec.split.v2.SplitService` with raw-bytes unary methods (no protobuf codegen; payloads are
safetensors, see `fellrec_flwr.split.wire`, JSON where the engine says so):

    Health       liveness, {"status": "ok"}; no credentials, never reads its request, never waits
    Info         hidden size, layer range, dtype, limits, a weight probe, the caller's own counts
                 (service-wide for the operator's key); needs a token, takes no body
    Forward      hidden [B,Q,H] (+ attention_mask, position_ids) -> hidden; metadata keep_graph
    Backward     the same inputs + grad -> grad w.r.t. the input hidden
    InferCreate  JSON {} -> {"session": id}
    InferStep    one generation step in a server-side KV-cache session
    InferClose   JSON {"sessions": [ids]}

Every call but Health carries `x-client-key` / `x-client-token` call metadata (HMAC, see
`fellrec_flwr.split.auth`), checked in constant time on the metadata alone, before a worker
reads a byte of the message: a call without valid credentials is refused at once and its
message is never read. A refusal is a gRPC status (`GRPC_CODES`) whose details are the engine's
message, with the machine-readable code in the trailing metadata; an unexpected failure is
INTERNAL with an incident id only (the traceback goes to the log). What the library gives: TLS,
message-size limits (RESOURCE_EXHAUSTED), client deadlines (honoured while a call waits for the
compute lock), keep-alive pings, HTTP/2 with TCP_NODELAY, a bounded thread pool, caps on calls in
flight, connections and streams per connection. Ours: an authenticated call's message must arrive
within `--read-timeout`, and compute calls take at most `workers - 2` workers. Generation stays
one unary call per step (see docs/split.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import secrets
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import torch

from fellrec_flwr.paths import default_secret_file  # noqa: F401 (where a simulation's secret lives; re-exported)
from fellrec_flwr.split.auth import KEY_METADATA, TOKEN_METADATA, load_secret, server_credentials
from fellrec_flwr.split.engine import ApiError, ServiceLimits, SplitService, make_body  # noqa: F401 (re-exported)
from fellrec_flwr.split.plan import SplitError
from fellrec_flwr.split.wire import ERROR_CODE_KEY, ERROR_STATUS_KEY, SERVICE

log = logging.getLogger("fellrec.split_service")

# The engine's HTTP-style status classes as gRPC codes.
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,  # unknown_session
    409: grpc.StatusCode.FAILED_PRECONDITION,  # session_out_of_sync
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # over a size limit or the client's KV quota: not retried
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,  # service_full / service_busy: retried with back-off
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# method -> engine call; each takes a compute slot (Health and Info are answered outside them).
_ROUTES: dict[str, Callable[..., bytes]] = {
    "Forward": SplitService.forward,
    "Backward": SplitService.backward,
    "InferCreate": SplitService.infer_create,
    "InferStep": SplitService.infer_step,
    "InferClose": SplitService.infer_close,
}


def _printable(value: Any, limit: int = 64) -> str:
    """A metadata value fit for one log line: control characters escaped, length capped."""
    return repr(str(value)[:limit])


class _Transport(grpc.GenericRpcHandler):
    """gRPC handlers around one engine: credentials, read deadlines, compute slots, error mapping.

    `service()` is gRPC's per-call handler lookup. It runs on the server's polling thread with the
    method name and the call metadata, before a worker is taken and before a byte of the message is
    read, so credentials are checked there (the equivalent of an interceptor): a call without valid
    credentials gets a handler that refuses it at once and never reads its message. Every handler
    takes its request as a stream (one message expected), so the library starts no read on a worker
    before our code runs; Health never reads at all. Only an authenticated call reads its message,
    within `read_timeout_s`, while it holds a slot: compute calls share `workers - 2` slots, Info has
    one, so Health and refusals always find a free worker.
    """

    def __init__(self, service: SplitService):
        self.engine = service
        compute = threading.BoundedSemaphore(max(1, service.limits.max_workers - 2))
        self._slots = {**{name: compute for name in _ROUTES}, "Info": threading.BoundedSemaphore(1)}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        # On the polling thread, under the server's lock: only cheap, non-blocking work here.
        prefix = f"/{SERVICE}/"
        method = handler_call_details.method or ""
        name = method[len(prefix):] if method.startswith(prefix) else ""
        if name == "Health":
            return grpc.stream_unary_rpc_method_handler(_health)
        if name not in self._slots:
            return None  # UNIMPLEMENTED, from the library
        metadata = dict(handler_call_details.invocation_metadata or ())
        key = metadata.get(KEY_METADATA)
        try:
            client = self.engine.authenticate(key, metadata.get(TOKEN_METADATA))
        except ApiError as err:
            refusal = err
            return grpc.stream_unary_rpc_method_handler(
                lambda requests, context: self._refuse(name, key, refusal, context))
        return grpc.stream_unary_rpc_method_handler(
            lambda requests, context: self._call(name, client, requests, context))

    def _call(self, name: str, client: str, requests: Any, context: grpc.ServicerContext) -> bytes:
        service = self.engine
        service.count(client, "requests")
        try:
            slot = self._slots[name]
            if not slot.acquire(blocking=False):  # before the message is read: a busy service reads nothing
                raise ApiError(503, "service_busy", "every worker is busy with other calls; retry shortly "
                                                    "(the client does, with back-off).")
            try:
                request = self._read(requests, context)
                log.debug("call %s from %s (%d bytes)", name, _printable(client), len(request))  # the access log
                if name == "Info":
                    if request:
                        raise ApiError(400, "unexpected_body", "Info takes an empty request.")
                    return json.dumps(service.info(client)).encode()
                return _ROUTES[name](service, client, request, self._deadline(context))
            finally:
                slot.release()
        except ApiError as err:
            refusal = err
        except _ReadCancelled as ended:  # the call is over: its status, if any, was the library's
            service.count(client, "errors")
            log.info("cut %s from %s: %s", name, _printable(client), ended)
            raise ended.rpc_error from None  # the library's own error for an ended call: it ends quietly
        except Exception:  # a bug or an out-of-memory: logged in full here, never sent to the client
            incident = secrets.token_hex(4)
            log.exception("internal error %s in %s", incident, name)
            refusal = ApiError(500, "internal_error", f"the service failed on this request (incident {incident}; "
                                                      "the operator finds it in the service log).")
        service.count(client, "errors")
        return self._refuse(name, client, refusal, context, counted=True)

    def _refuse(self, name: str, key: Any, refusal: ApiError, context: grpc.ServicerContext,
                counted: bool = False) -> bytes:
        if not counted:  # refused before authentication: counted service-wide only
            self.engine.count(None, "requests")
            self.engine.count(None, "errors")
        log.info("refused %s from %s: %s %s", name, _printable(key or "?"), refusal.code, refusal.message)
        context.set_trailing_metadata(((ERROR_CODE_KEY, refusal.code), (ERROR_STATUS_KEY, str(refusal.status))))
        context.abort(GRPC_CODES.get(refusal.status, grpc.StatusCode.UNKNOWN), refusal.message)

    def _read(self, requests: Any, context: grpc.ServicerContext) -> bytes:
        """The call's one message. A sender that has not delivered it within read_timeout_s is
        cancelled (RST_STREAM), which frees this worker; a client's shorter deadline also applies."""
        timeout, expired = self.engine.limits.read_timeout_s, threading.Event()

        def cut() -> None:
            expired.set()
            context.cancel()

        timer = threading.Timer(timeout, cut)
        timer.daemon = True
        timer.start()
        try:
            message = next(requests, None)
        except grpc.RpcError as err:  # the call ended before its message arrived whole
            why = (f"no complete message within {timeout:g} s (--read-timeout)" if expired.is_set() else
                   "the message never arrived whole (over --max-message-mb, or the client cancelled)")
            raise _ReadCancelled(why, err) from None
        finally:
            timer.cancel()
        if message is None:
            raise ApiError(400, "missing_message", "the call ended without a request message.")
        return message

    def _deadline(self, context: grpc.ServicerContext) -> float:
        """The call's deadline on time.monotonic(): the client's, capped by request_timeout_s."""
        remaining = context.time_remaining()
        cap = self.engine.limits.request_timeout_s
        return time.monotonic() + (cap if remaining is None else min(remaining, cap))


class _ReadCancelled(Exception):
    def __init__(self, message: str, rpc_error: grpc.RpcError):
        super().__init__(message)
        self.rpc_error = rpc_error


_HEALTH = json.dumps({"status": "ok"}).encode()


def _health(requests: Any, context: grpc.ServicerContext) -> bytes:
    """Liveness only: no credentials, nothing about clients, never the compute lock, and the
    request is never read (a body is discarded unread), so a silent caller holds no worker."""
    return _HEALTH


def _server_options(limits: ServiceLimits, max_message: int) -> list[tuple[str, int]]:
    ms = lambda s: int(s * 1000)  # noqa: E731
    return [
        # bigger messages are refused by the library (only authenticated calls read one at all)
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message + (1 << 20)),  # a reply = its request + header
        ("grpc.so_reuseport", 0),  # a second service on the same port must fail, not share it
        # what one peer can hold: connections, streams on one connection, time to finish the handshake
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_concurrent_streams", limits.max_workers),  # more calls wait on the client's side
        ("grpc.server_handshake_timeout_ms", ms(min(limits.read_timeout_s, 20.0))),
        ("grpc.keepalive_time_ms", ms(limits.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(limits.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),  # dead idle peers are found too
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients ping every 60 s
        ("grpc.max_connection_age_ms", ms(limits.request_timeout_s)),
        ("grpc.max_connection_age_grace_ms", ms(limits.request_timeout_s)),
    ]


@dataclass
class ServiceHandle:
    url: str
    host: str
    port: int
    service: SplitService
    _server: grpc.Server

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; calls in flight get `grace` seconds. Returns once the port is free."""
        self._server.stop(grace).wait(grace + 10)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def start_service(model: Any, secret: bytes, front_k: int = 1, back_k: int = 1, host: str = "127.0.0.1",
                  port: int = 0, device: str = "cpu", dtype: str | None = None, limits: ServiceLimits | None = None,
                  tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                  work_dir: str | Path | None = None, insecure: bool = False) -> ServiceHandle:
    """Serve the middle layers of `model` (ServerBody, full model, or checkpoint path) on a gRPC server
    running in background threads. `handle.url` is https://host:port with TLS, http://host:port without.
    Plaintext is for loopback only, unless `insecure` (a trusted development network)."""
    if bool(tls_cert) != bool(tls_key):
        raise SplitError("TLS needs both --tls-cert and --tls-key.")
    if not tls_cert and not insecure and not _is_loopback(host):
        raise SplitError(f"refusing to serve on {host} without TLS: client tokens would travel in clear. Pass "
                         "--tls-cert and --tls-key (deploy/start_split_service.sh does), listen on 127.0.0.1, or "
                         "pass --insecure on a trusted development network only.")
    credentials = server_credentials(tls_cert, tls_key) if tls_cert else None  # a bad pair fails here, clearly
    body = make_body(model, front_k, back_k, device, dtype, work_dir)
    service = SplitService(body, secret, limits)
    lim = service.limits
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=lim.max_workers, thread_name_prefix="split-service"),
                         handlers=[_Transport(service)], options=_server_options(lim, service.max_message_bytes),
                         maximum_concurrent_rpcs=lim.max_concurrent_rpcs)
    try:
        if credentials is not None:
            bound = server.add_secure_port(_address(host, port), credentials)
        else:
            bound = server.add_insecure_port(_address(host, port))
    except RuntimeError:
        bound = 0
    if not bound:
        raise SplitError(f"the split service cannot listen on {_address(host, port)} (port in use, or not an "
                         "address of this machine); choose another --host/--port.")
    server.start()
    url = f"{'https' if tls_cert else 'http'}://{_address(host, bound)}"
    log.info("split service at %s (%s)", url, body.plan.describe())
    return ServiceHandle(url, host, int(bound), service, server)


def start_service_for_run(cfg: Any, checkpoint: str | Path, secret_file: str | Path | None = None) -> ServiceHandle:
    """Simulation convenience: serve this run's middle layers on loopback, from `checkpoint` (the
    model's safetensors folder, `fellrec_flwr.runtime.model_checkpoint(cfg)`; the service itself
    prepares no data).

    Only the middle layers are read from the checkpoint (`fellrec_flwr.model.parts.load_server_part`; 8/4-bit
    as configured), onto `split.service-device` (not `model.device`, the clients'). The secret is read
    from `secret_file` (default
    `<cache>/split-secret.txt`, created with mode 600 if absent); simulated clients on the same
    machine derive their tokens from it. In a deployment run the service as its own process.
    """
    from dataclasses import replace

    from fellrec_flwr.model.loading import resolve_device
    from fellrec_flwr.model.parts import load_server_part
    from fellrec_flwr.model.precision import use_tf32
    from fellrec_flwr.split.auth import write_secret

    resolve_device(cfg.split.service_device, key="split.service-device")  # a bad value named as such
    path = Path(secret_file or default_secret_file())
    if not path.exists():
        write_secret(path)
    body = load_server_part(replace(cfg.model, device=cfg.split.service_device), checkpoint, cfg.split.front_k,
                            cfg.split.back_k)
    device = next(body.parameters()).device
    use_tf32(cfg.train.tf32, device)
    return start_service(body, load_secret(path), body.plan.front_k, body.plan.back_k, device=str(device))


def _tiny_model(args: argparse.Namespace) -> Any:
    from fellrec_flwr.model.tiny import build_tiny_model, load_tokenizer

    if not args.tokenizer:
        raise SplitError("--model tiny needs --tokenizer DIR (the tiny tokenizer folder the clients use), "
                         "or save the full tiny model with split.save_full_model and pass its folder.")
    return build_tiny_model(load_tokenizer(args.tokenizer), args.tiny_hidden, args.tiny_layers, args.tiny_heads,
                            seed=args.tiny_seed)


def main(argv: list[str] | None = None) -> None:
    from fellrec_flwr.config import ModelConfig

    d = ModelConfig()
    lim = ServiceLimits()
    p = argparse.ArgumentParser(prog="python -m server_app.split_service", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="'tiny', a safetensors folder, or a .gguf file/folder")
    p.add_argument("--front-k", type=int, default=1)
    p.add_argument("--back-k", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--secret-file", required=True,
                   help="server secret (create one: python -m fellrec_flwr.split.auth new-secret F)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext on a non-loopback --host (tokens travel in clear: trusted networks only)")
    p.add_argument("--work-dir", default=None, help="where a GGUF file is converted to safetensors once")
    p.add_argument("--tokenizer", default="", help="tiny only: the tokenizer folder")
    p.add_argument("--tiny-hidden", type=int, default=d.tiny_hidden)
    p.add_argument("--tiny-layers", type=int, default=d.tiny_layers)
    p.add_argument("--tiny-heads", type=int, default=d.tiny_heads)
    p.add_argument("--tiny-seed", type=int, default=0)
    p.add_argument("--activation-cache-mb", type=int, default=lim.activation_cache_bytes >> 20,
                   help="graphs kept between forward and backward; 0 = always recompute (pure Petals)")
    p.add_argument("--session-cache-mb", type=int, default=lim.session_cache_bytes >> 20)
    p.add_argument("--session-quota-mb", type=int, default=lim.session_bytes_per_client >> 20,
                   help="KV memory of one client's sessions together; a step over it is refused with 413 "
                        "(--session-cache-mb must be at least this)")
    p.add_argument("--session-ttl", type=float, default=lim.session_ttl_s)
    p.add_argument("--request-timeout", type=float, default=lim.request_timeout_s,
                   help="longest wait for the compute lock, and a connection's lifetime (then GOAWAY; its calls in "
                        "flight get as long again)")
    p.add_argument("--read-timeout", type=float, default=lim.read_timeout_s,
                   help="an authenticated call's message must arrive within this many seconds, else the call is cut")
    p.add_argument("--max-message-mb", type=int, default=lim.max_body_bytes >> 20,
                   help="largest request message; 0 = derived from the model: a Backward of --max-tokens positions "
                        "in float32, clamped to 16-256 MiB (each worker reading a message may hold this much)")
    p.add_argument("--max-connections", type=int, default=lim.max_connections,
                   help="open connections; more are refused")
    p.add_argument("--workers", type=int, default=lim.max_workers,
                   help="server threads; compute calls take at most workers - 2, Info one, so Health always finds one")
    p.add_argument("--max-concurrent-rpcs", type=int, default=lim.max_concurrent_rpcs,
                   help="calls in flight; more are refused with RESOURCE_EXHAUSTED (clients retry)")
    p.add_argument("--max-batch", type=int, default=lim.max_batch)
    p.add_argument("--max-seq", type=int, default=lim.max_seq)
    p.add_argument("--max-tokens", type=int, default=lim.max_tokens, help="batch x sequence of one request")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.session_cache_mb < args.session_quota_mb:
        p.error(f"--session-cache-mb {args.session_cache_mb} is below --session-quota-mb {args.session_quota_mb}: "
                "one client could fill the whole KV cache and keep every other client out; make the cache at "
                "least the quota (a multiple of it: cache / quota clients fit at once) or lower the quota")
    limits = ServiceLimits(activation_cache_bytes=args.activation_cache_mb << 20,
                           session_cache_bytes=args.session_cache_mb << 20, session_ttl_s=args.session_ttl,
                           session_bytes_per_client=args.session_quota_mb << 20,
                           request_timeout_s=args.request_timeout, read_timeout_s=args.read_timeout,
                           max_workers=args.workers, max_concurrent_rpcs=args.max_concurrent_rpcs,
                           max_connections=args.max_connections, max_body_bytes=args.max_message_mb << 20,
                           max_batch=args.max_batch, max_seq=args.max_seq, max_tokens=args.max_tokens)
    try:
        model = _tiny_model(args) if args.model == "tiny" else args.model
        handle = start_service(model, load_secret(args.secret_file), args.front_k, args.back_k, args.host, args.port,
                               args.device, args.dtype, limits, args.tls_cert, args.tls_key, args.work_dir,
                               insecure=args.insecure)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"split service listening on {handle.url} ({handle.service.body.plan.describe()})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    handle.stop()


if __name__ == "__main__":
    main()
