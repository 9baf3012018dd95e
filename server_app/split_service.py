"""The split-inference service: the server-held middle layers for many clients, over gRPC.

    python -m server_app.split_service --model PATH|GGUF|tiny --front-k 1 --back-k 1 \\
        --secret-file secret.txt [--device cuda] [--port 8470] [--tls-cert c.pem --tls-key k.pem]

A thin transport over the engine `fellrec_flwr.split.engine.SplitService`: gRPC service
`fellrec.split.v2.SplitService` with raw-bytes unary methods (no protobuf codegen; payloads are
safetensors, see `fellrec_flwr.split.wire`, JSON where the engine says so):

    Health       liveness, {"status": "ok"}; no credentials, never waits for the compute lock
    Info         hidden size, layer range, dtype, limits, a weight probe (needs a token)
    Forward      hidden [B,Q,H] (+ attention_mask, position_ids) -> hidden; metadata keep_graph
    Backward     the same inputs + grad -> grad w.r.t. the input hidden
    InferCreate  JSON {} -> {"session": id}
    InferStep    one generation step in a server-side KV-cache session
    InferClose   JSON {"sessions": [ids]}

Every call but Health carries `x-client-key` / `x-client-token` call metadata (HMAC, see
`fellrec_flwr.split.auth`), checked in constant time before anything else. A refusal is a gRPC
status (`GRPC_CODES`) whose details are the engine's message, with the machine-readable code in
the trailing metadata; an unexpected failure is INTERNAL with an incident id only (the traceback
goes to the log). What the library gives: TLS, message-size limits enforced before a message
reaches us (RESOURCE_EXHAUSTED), client deadlines (honoured while a call waits for the compute
lock), keep-alive pings, HTTP/2 with TCP_NODELAY, a bounded thread pool and a cap on calls in
flight. Generation stays one unary call per step (see docs/split.md).
"""

from __future__ import annotations

import argparse
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


class _Transport:
    """gRPC handlers around one engine: credentials, deadlines, compute slots, error mapping."""

    def __init__(self, service: SplitService):
        self.service = service
        limits = service.limits
        # Compute is serialised by the engine's lock; at most this many calls wait for it, so two
        # workers always stay free for Health and Info.
        self._slots = threading.BoundedSemaphore(max(1, limits.max_workers - 2))

    def handlers(self) -> grpc.GenericRpcHandler:
        methods = {name: self._unary(name) for name in (*_ROUTES, "Info", "Health")}
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _unary(self, name: str) -> grpc.RpcMethodHandler:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self._call(name, request, context)

        # no (de)serializers: requests and replies are the raw bytes
        return grpc.unary_unary_rpc_method_handler(call)

    def _call(self, name: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        service, key = self.service, None
        try:
            if name == "Health":  # liveness only: nothing about clients, and never the compute lock
                if request:
                    raise ApiError(400, "unexpected_body", "Health takes an empty request.")
                return json.dumps({"status": "ok"}).encode()
            service.stats["requests"] += 1
            metadata = dict(context.invocation_metadata())
            key = metadata.get(KEY_METADATA)
            client = service.authenticate(key, metadata.get(TOKEN_METADATA))
            log.debug("call %s from %s (%d bytes)", name, _printable(client), len(request))  # the access log
            if name == "Info":
                return json.dumps(service.info()).encode()
            if not self._slots.acquire(blocking=False):
                raise ApiError(503, "service_busy", "every worker is waiting for the compute lock; retry shortly "
                                                    "(the client does, with back-off).")
            try:
                return _ROUTES[name](service, client, request, self._deadline(context))
            finally:
                self._slots.release()
        except ApiError as err:
            refusal = err
        except Exception:  # a bug or an out-of-memory: logged in full here, never sent to the client
            incident = secrets.token_hex(4)
            log.exception("internal error %s in %s", incident, name)
            refusal = ApiError(500, "internal_error", f"the service failed on this request (incident {incident}; "
                                                      "the operator finds it in the service log).")
        service.stats["errors"] += 1
        log.info("refused %s from %s: %s %s", name, _printable(key or "?"), refusal.code, refusal.message)
        context.set_trailing_metadata(((ERROR_CODE_KEY, refusal.code), (ERROR_STATUS_KEY, str(refusal.status))))
        context.abort(GRPC_CODES.get(refusal.status, grpc.StatusCode.UNKNOWN), refusal.message)

    def _deadline(self, context: grpc.ServicerContext) -> float:
        """The call's deadline on time.monotonic(): the client's, capped by request_timeout_s."""
        remaining = context.time_remaining()
        cap = self.service.limits.request_timeout_s
        return time.monotonic() + (cap if remaining is None else min(remaining, cap))


def _server_options(limits: ServiceLimits) -> list[tuple[str, int]]:
    ms = lambda s: int(s * 1000)  # noqa: E731
    return [
        # bigger messages are refused by the library before they reach a handler
        ("grpc.max_receive_message_length", limits.max_body_bytes),
        ("grpc.max_send_message_length", limits.max_body_bytes + (1 << 20)),  # a reply = its request + header
        ("grpc.so_reuseport", 0),  # a second service on the same port must fail, not share it
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


def start_service(model: Any, secret: bytes, front_k: int = 1, back_k: int = 1, host: str = "127.0.0.1",
                  port: int = 0, device: str = "cpu", dtype: str | None = None, limits: ServiceLimits | None = None,
                  tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                  work_dir: str | Path | None = None) -> ServiceHandle:
    """Serve the middle layers of `model` (ServerBody, full model, or checkpoint path) on a gRPC server
    running in background threads. `handle.url` is https://host:port with TLS, http://host:port without."""
    if bool(tls_cert) != bool(tls_key):
        raise SplitError("TLS needs both --tls-cert and --tls-key.")
    body = make_body(model, front_k, back_k, device, dtype, work_dir)
    service = SplitService(body, secret, limits)
    lim = service.limits
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=lim.max_workers, thread_name_prefix="split-service"),
                         handlers=[_Transport(service).handlers()], options=_server_options(lim),
                         maximum_concurrent_rpcs=lim.max_concurrent_rpcs)
    try:
        if tls_cert:
            bound = server.add_secure_port(_address(host, port), server_credentials(tls_cert, tls_key))
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
    and `cuda:N` as configured). The secret is read from `secret_file` (default
    `<cache>/split-secret.txt`, created with mode 600 if absent); simulated clients on the same
    machine derive their tokens from it. In a deployment run the service as its own process.
    """
    from fellrec_flwr.model.parts import load_server_part
    from fellrec_flwr.split.auth import write_secret

    path = Path(secret_file or default_secret_file())
    if not path.exists():
        write_secret(path)
    body = load_server_part(cfg.model, checkpoint, cfg.split.front_k, cfg.split.back_k)
    device = next(body.parameters()).device
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
                   help="KV memory of one client's sessions together; a step over it is refused with 413")
    p.add_argument("--session-ttl", type=float, default=lim.session_ttl_s)
    p.add_argument("--request-timeout", type=float, default=lim.request_timeout_s,
                   help="longest wait for the compute lock, and a connection's lifetime (then GOAWAY; its calls in "
                        "flight get as long again): a sender that never finishes frees its worker within twice this")
    p.add_argument("--workers", type=int, default=lim.max_workers, help="server threads (two stay free for Health/Info)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=lim.max_concurrent_rpcs,
                   help="calls in flight; more are refused with RESOURCE_EXHAUSTED (clients retry)")
    p.add_argument("--max-batch", type=int, default=lim.max_batch)
    p.add_argument("--max-seq", type=int, default=lim.max_seq)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = ServiceLimits(activation_cache_bytes=args.activation_cache_mb << 20,
                           session_cache_bytes=args.session_cache_mb << 20, session_ttl_s=args.session_ttl,
                           session_bytes_per_client=args.session_quota_mb << 20,
                           request_timeout_s=args.request_timeout, max_workers=args.workers,
                           max_concurrent_rpcs=args.max_concurrent_rpcs,
                           max_batch=args.max_batch, max_seq=args.max_seq)
    try:
        model = _tiny_model(args) if args.model == "tiny" else args.model
        handle = start_service(model, load_secret(args.secret_file), args.front_k, args.back_k, args.host, args.port,
                               args.device, args.dtype, limits, args.tls_cert, args.tls_key, args.work_dir)
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
