"""The client side of the split: a real `LlamaForCausalLM` whose middle layers live on the service.

`make_split_model(model, plan, service_client)` replaces decoder layer `front_k` by a
`RemoteBody` proxy and the other server-held layers by `PassThrough`. Everything else is the
unchanged Hugging Face model: peft LoRA, `model(**batch).loss`, `model.generate` (greedy,
sampling, beam search) and the grounding embeddings keep working, with layer indices (so
LoRA key names and KV-cache slots) identical to the unsplit model.

What crosses the network (after the client's wire defence, if any: `fellrec_flwr.split.defence`):
hidden states at the cut, the 2-D padding mask, position ids,
gradients w.r.t. the returned hidden states, and (in beam search) beam indices. Token ids,
labels, the embedding and the LM head never leave the client.

The transport is one gRPC channel per `SplitServiceClient` (HTTP/2: the calls of all threads
share one connection), raw-bytes unary calls of `fellrec.split.v2.SplitService` with the key and
token as call metadata. Three ways through the proxy:
- training (grad enabled, input needs grad): a torch.autograd.Function; forward = Forward,
  backward = Backward with the same input + the output's gradient;
- inference with a KV cache (generate): InferStep in a server-side session tied to the
  client's cache object; beam reorders are forwarded; if the session is lost (service
  restart, eviction) it is rebuilt by replaying the hidden states sent so far;
- anything else (no grad, no cache): a plain Forward.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import grpc
import numpy as np
import torch
from torch import nn

from fellrec_flwr.split.auth import auth_metadata, channel_credentials, issue_token, load_secret
from fellrec_flwr.split.defence import WireDefence
from fellrec_flwr.split.plan import PassThrough, SplitError, SplitPlan, _causal_lm, server_layer_adapters
from fellrec_flwr.split.wire import ERROR_CODE_KEY, ERROR_STATUS_KEY, METHODS, decode, encode, method_path, wire_dtype

log = logging.getLogger(__name__)

BodyObserver = Callable[[str, bytes], None]  # (method name, request bytes) — for audits and tests
_SESSION_LOST = {"unknown_session", "session_out_of_sync"}
# The HTTP-style status class of a gRPC code the library raised itself (no engine code attached).
_STATUS_OF = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
              grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
              grpc.StatusCode.UNIMPLEMENTED: 404, grpc.StatusCode.FAILED_PRECONDITION: 409,
              grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.UNAVAILABLE: 503,
              grpc.StatusCode.DEADLINE_EXCEEDED: 504}


class SplitServiceError(ValueError):
    """The service refused a call: `status` (HTTP-style class: 400, 401, 403, 404, 409, 413, 500, 503,
    504), machine-readable `code`, message, and the gRPC status as `grpc_code`."""

    def __init__(self, status: int, code: str, message: str, grpc_code: grpc.StatusCode | None = None):
        super().__init__(f"split service: {status} {code}: {message}")
        self.status, self.code, self.message, self.grpc_code = status, code, message, grpc_code


class SplitServiceUnavailable(ConnectionError):
    """The service could not be reached after all retries."""


# ---------------------------------------------------------------------------
# gRPC client
# ---------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_service_url(url: str, tls_configured: bool, allow_insecure_http: bool = False) -> None:
    """The token is a bearer credential: it only travels over TLS, except to this machine.

    The URL's scheme says which: https://host:port is gRPC over TLS, http://host:port plaintext
    gRPC. Plaintext is accepted for a loopback host (a local simulation: nothing leaves the machine)
    or with the explicit development flag `allow_insecure_http`, never when a CA is configured
    (that says TLS was meant).
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.path.strip("/"):
        raise SplitError(f"split service url {url!r} must look like https://host:port (or http://127.0.0.1:port).")
    if parts.scheme == "https":
        return
    if tls_configured:
        raise SplitError(f"split service url {url!r} is plain http but a CA file is configured: use "
                         f"https://{parts.netloc} so the token is encrypted and the server verified.")
    if not (_is_loopback(parts.hostname) or allow_insecure_http):
        raise SplitError(f"split service url {url!r} is plain http to another machine: the client token would "
                         f"travel in clear. Use https://{parts.netloc} (start_split_service.sh serves TLS); "
                         "allow_insecure_http=True exists for a trusted development network only.")


def _retryable(err: SplitServiceError) -> bool:
    """Worth another try: the service is down, restarting, full or busy. Never a refusal of this very
    request (INVALID_ARGUMENT, RESOURCE_EXHAUSTED over a limit, INTERNAL: a retry repeats it)."""
    if err.grpc_code == grpc.StatusCode.UNAVAILABLE:
        return True
    # the library's cap on calls in flight (maximum_concurrent_rpcs) answers RESOURCE_EXHAUSTED too
    return err.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.code == "service_busy"


class SplitServiceClient:
    """Talks to one split service over one gRPC channel, with per-call timeouts and bounded retries.

    Retries cover UNAVAILABLE (unreachable, restarting, `service_full`, `service_busy`) and the
    library's concurrency cap, with delays backoff, 2*backoff, ... capped at max_backoff; any other
    refusal raises SplitServiceError at once. `timeout` is each call's deadline, which the service
    honours too (a call that waited past it for the compute lock is not computed).
    """

    def __init__(self, url: str, client_key: str, token: str, timeout: float = 120.0, retries: int = 6,
                 backoff: float = 0.25, max_backoff: float = 8.0, ca_file: str | Path | None = None,
                 credentials: grpc.ChannelCredentials | None = None, body_observer: BodyObserver | None = None,
                 allow_insecure_http: bool = False, max_message_bytes: int = 1 << 30):
        check_service_url(url, tls_configured=bool(ca_file or credentials), allow_insecure_http=allow_insecure_http)
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.tls = parts.scheme == "https"
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.target = f"{host}:{parts.port or (443 if self.tls else 80)}"
        self.client_key, self._metadata = client_key, auth_metadata(client_key, token)
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self._credentials = (credentials or channel_credentials(ca_file)) if self.tls else None
        ms = lambda s: max(1, int(s * 1000))  # noqa: E731
        # No retry policy is configured, so gRPC itself only retries calls that never reached the
        # service (transparent retries); every other retry is ours (`request`), bounded and logged.
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 60_000),  # find a dead connection while idle between rounds
            ("grpc.keepalive_timeout_ms", 20_000),
            # reconnect as fast as we retry (the library's default starts at 1 s)
            ("grpc.initial_reconnect_backoff_ms", ms(backoff)),
            ("grpc.min_reconnect_backoff_ms", ms(backoff)),
            ("grpc.max_reconnect_backoff_ms", ms(max_backoff)),
        ]
        self.body_observer = body_observer
        self.stats: dict[str, float] = {"requests": 0, "bytes_sent": 0, "bytes_received": 0, "retries": 0,
                                        "wait_s": 0.0}  # wait_s: time inside calls (network + service)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._pending_close: list[str] = []
        self._info: dict[str, Any] | None = None

    # -- transport --------------------------------------------------------------------------

    def _call(self, method: str) -> grpc.UnaryUnaryMultiCallable:
        with self._lock:
            if self._channel is None:  # opened on first use (and again after close())
                self._channel = grpc.secure_channel(self.target, self._credentials, self._options) if self.tls \
                    else grpc.insecure_channel(self.target, self._options)
                # no (de)serializers: requests and replies are raw bytes
                self._calls = {name: self._channel.unary_unary(method_path(name)) for name in METHODS}
            return self._calls[method]

    def request(self, method: str, body: bytes = b"") -> bytes:
        """One call of `method` (Forward, InferStep, ...) with retries; returns the reply or raises."""
        if self.body_observer is not None and body:
            self.body_observer(method, body)
        last: SplitServiceError | None = None
        for attempt in range(self.retries + 1):
            start = time.perf_counter()
            try:
                data = self._call(method)(body, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                last = _service_error(err)
                if not _retryable(last):
                    raise last from None
            else:
                with self._lock:
                    self.stats["wait_s"] += time.perf_counter() - start
                    self.stats["requests"] += 1
                    self.stats["bytes_sent"] += len(body)
                    self.stats["bytes_received"] += len(data)
                return data
            if attempt == self.retries:
                break
            delay = min(self.backoff * 2 ** attempt, self.max_backoff) * (1 + 0.1 * random.random())
            self.stats["retries"] += 1
            log.warning("split service %s failed (%s); retry %d/%d in %.2fs", method, last, attempt + 1,
                        self.retries, delay)
            time.sleep(delay)
        assert last is not None
        if last.code == "unavailable":  # never reached the service (no engine code)
            raise SplitServiceUnavailable(f"split service at {self.url} unreachable after {self.retries + 1} "
                                          f"attempts: {last.message}")
        raise last

    def close(self) -> None:
        self.flush_closes()
        with self._lock:
            channel, self._channel, self._calls = self._channel, None, {}
        if channel is not None:
            channel.close()

    # -- API --------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return json.loads(self.request("Health"))

    def info(self, refresh: bool = False) -> dict[str, Any]:
        if self._info is None or refresh:
            self._info = json.loads(self.request("Info"))
        return self._info

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                keep_graph: bool = False) -> tuple[torch.Tensor, str]:
        """Middle-layer output for `hidden`; with keep_graph, also the id of the kept graph ('' if none)."""
        tensors = _inputs(hidden, attention_mask, position_ids)
        data = self.request("Forward", encode(tensors, {"keep_graph": "1" if keep_graph else "0"}))
        out, meta = decode(data)
        return out["hidden"], meta.get("activation_id", "")

    def backward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                 grad: torch.Tensor, activation_id: str = "") -> torch.Tensor:
        tensors = {**_inputs(hidden, attention_mask, position_ids), "grad": grad}
        meta = {"activation_id": activation_id} if activation_id else {}
        out, _ = decode(self.request("Backward", encode(tensors, meta)))
        return out["grad"]

    def infer_step(self, session: str, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor, past_len: int,
                   beam_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """One step of an inference session ('' creates one); returns (hidden, session id)."""
        tensors = _inputs(hidden, attention_mask, position_ids)
        if beam_idx is not None:
            tensors["beam_idx"] = beam_idx.to(torch.int32)
        with self._lock:
            closing, self._pending_close = self._pending_close, []
        meta = {"session": session, "past_len": str(past_len)}
        if closing:
            meta["close"] = ",".join(closing)
        try:
            out, reply = decode(self.request("InferStep", encode(tensors, meta)))
        except Exception:
            with self._lock:
                self._pending_close += closing
            raise
        return out["hidden"], reply["session"]

    def close_later(self, session: str) -> None:
        """Queue a session to be closed with the next step (safe to call from a GC finalizer)."""
        if session:
            with self._lock:
                self._pending_close.append(session)

    def flush_closes(self) -> None:
        with self._lock:
            closing, self._pending_close = self._pending_close, []
        if closing:
            try:
                self.request("InferClose", json.dumps({"sessions": closing}).encode())
            except (SplitServiceError, SplitServiceUnavailable) as err:  # the TTL cleans up anyway
                log.info("could not close split sessions: %s", err)


def _inputs(hidden: torch.Tensor, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = {"hidden": hidden, "position_ids": position_ids}
    if attention_mask is not None:
        tensors["attention_mask"] = attention_mask
    return tensors


def _service_error(err: grpc.RpcError) -> SplitServiceError:
    """The engine's refusal (its code in the trailing metadata), or the library's own (no code)."""
    grpc_code: grpc.StatusCode = err.code()
    details = str(err.details() or "")
    trailing = dict(err.trailing_metadata() or ())
    code = trailing.get(ERROR_CODE_KEY)
    try:
        status = int(trailing.get(ERROR_STATUS_KEY, ""))
    except ValueError:
        status = _STATUS_OF.get(grpc_code, 500)
    if code is None:  # the library refused: too big, busy, unreachable, timed out, no such method
        if grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            code = "service_busy" if "concurrent rpc limit" in details.lower() else "message_too_large"
        else:
            code = grpc_code.name.lower()
    return SplitServiceError(status, str(code), details[:1000], grpc_code)


def service_client(url: str, client_key: str, token: str | None = None, secret_file: str | Path | None = None,
                   **kwargs: Any) -> SplitServiceClient:
    """A client from a token, or (simulation on one machine) from the server's secret file."""
    if token is None:
        if secret_file is None:
            raise SplitError("the split service needs a token for this client (or, in a local simulation, "
                             "the service's secret file to derive it).")
        token = issue_token(load_secret(secret_file), client_key)
    return SplitServiceClient(url, client_key, token, **kwargs)


# ---------------------------------------------------------------------------
# The proxy layer
# ---------------------------------------------------------------------------


class _RemoteMiddle(torch.autograd.Function):
    """Forward: the service runs the middle layers. Backward: the service returns d(out)/d(in)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, body: "RemoteBody", mask: torch.Tensor | None,
                positions: torch.Tensor) -> torch.Tensor:
        wire_h = body.defence.protect(hidden.detach(), mask).to(body.wire_dtype)
        out, activation_id = body.client.forward(wire_h, mask, positions, keep_graph=True)
        ctx.body, ctx.sent = body, (wire_h, mask, positions, activation_id)
        return out.to(device=hidden.device, dtype=hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        wire_h, mask, positions, activation_id = ctx.sent
        sent = ctx.body.defence.protect(grad.detach(), mask).to(wire_h.dtype)
        g = ctx.body.client.backward(wire_h, mask, positions, sent, activation_id)
        return g.to(device=grad.device, dtype=grad.dtype), None, None, None


@dataclass
class _SessionState:
    """Client-side view of one server inference session (one per KV-cache object)."""

    sid: str = ""
    past_len: int = 0
    hidden: list[torch.Tensor] = field(default_factory=list)  # what was sent, for replay
    positions: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    pending_beam: torch.Tensor | None = None


class RemoteBody(nn.Module):
    """Stands in for decoder layer `front_k`: sends the hidden states to the service and returns the
    output of layer L-back_k-1. Called by LlamaModel exactly like a decoder layer. `defence`
    (`fellrec_flwr.split.defence`) changes every hidden state and gradient before it is sent."""

    def __init__(self, client: SplitServiceClient, plan: SplitPlan, wire: str = "float32", replay: bool = True,
                 defence: WireDefence | None = None):
        super().__init__()
        self.client, self.plan, self.wire_dtype, self.replay = client, plan, wire_dtype(wire), replay
        self.defence = defence or WireDefence()
        self.padding_mask: torch.Tensor | None = None  # set by a pre-hook on LlamaModel
        self._sessions: "weakref.WeakKeyDictionary[Any, _SessionState]" = weakref.WeakKeyDictionary()

    def extra_repr(self) -> str:
        s = self.plan.server_layers
        return f"layers {s.start}..{s.stop - 1} at {self.client.url}, wire {self.wire_dtype}"

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = False,
                position_embeddings: Any = None, cache: Any = None, **kwargs: Any) -> torch.Tensor:
        # `attention_mask` here is the 4-D mask transformers built for the client's own layers: it is
        # not sent. The service builds its own from the padding of the new tokens (below) and the
        # cache length this client states, so the protocol does not depend on how a transformers
        # release shapes its masks. The KV cache arrives as `cache` (transformers >= 5.24) or
        # `past_key_values` (earlier).
        if position_ids is None:
            raise SplitError("RemoteBody needs position_ids (LlamaModel always passes them).")
        kv_cache = cache if cache is not None else past_key_values
        q = hidden_states.shape[1]
        mask = new_token_mask(self.padding_mask, q)
        positions = position_ids.to(torch.int32)
        if torch.is_grad_enabled():
            if hidden_states.requires_grad:
                return _RemoteMiddle.apply(hidden_states, self, mask, positions)
        elif kv_cache is not None and use_cache:
            return self._session_step(kv_cache, hidden_states, mask, positions)
        out, _ = self.client.forward(self.defence.protect(hidden_states.detach(), mask).to(self.wire_dtype), mask,
                                     positions)
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    # -- inference sessions -----------------------------------------------------------------

    def _state(self, cache: Any) -> _SessionState:
        state = self._sessions.get(cache)
        if state is None:
            state = _SessionState()
            self._sessions[cache] = state
            _forward_reorders(cache, state)
            weakref.finalize(cache, _close_later, self.client, state)
        return state

    def _session_step(self, cache: Any, hidden: torch.Tensor, mask: torch.Tensor | None,
                      positions: torch.Tensor) -> torch.Tensor:
        state = self._state(cache)
        b, q = hidden.shape[:2]
        seen = cache.get_seq_length()  # layer 0 already holds this step's tokens
        if seen != state.past_len + q:
            raise SplitError(f"the client KV cache holds {seen} tokens but the split session {state.past_len} + {q}: "
                             "the cache was changed outside forward/reorder (crop, batch_select, ...), which the "
                             "split does not support; use greedy, sampling or beam search.")
        wire_h = self.defence.protect(hidden.detach(), mask).to(self.wire_dtype)
        beam, state.pending_beam = state.pending_beam, None
        step_mask = mask if mask is not None else torch.ones(b, q, dtype=torch.bool)
        if beam is not None and self.replay:
            state.hidden = [h[beam] for h in state.hidden]
            state.positions = [p[beam] for p in state.positions]
            state.masks = [m[beam] for m in state.masks]
        try:
            out, sid = self.client.infer_step(state.sid, wire_h, mask, positions, state.past_len, beam)
        except SplitServiceError as err:
            if not (self.replay and state.sid and err.code in _SESSION_LOST):
                raise
            log.warning("split inference session lost (%s); replaying %d tokens", err.code, state.past_len)
            all_h = torch.cat([*state.hidden, wire_h], dim=1)
            all_pos = torch.cat([*state.positions, positions.expand(b, q)], dim=1)
            all_mask = torch.cat([*state.masks, step_mask], dim=1)
            out, sid = self.client.infer_step("", all_h, all_mask, all_pos, 0)
            out = out[:, -q:]
        state.sid, state.past_len = sid, state.past_len + q
        if self.replay:
            state.hidden.append(wire_h)
            state.positions.append(positions.expand(b, q).contiguous())
            state.masks.append(step_mask)
        return out.to(device=hidden.device, dtype=hidden.dtype)


def new_token_mask(padding_mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
    """The padding mask [B, q] of the q tokens being sent, from the 2-D mask the model was called
    with: [B, q] in training, [B, past + q] during generation (transformers extends it per step)."""
    if padding_mask is None:
        return None
    if padding_mask.shape[1] < q:
        raise SplitError(f"the attention_mask covers {padding_mask.shape[1]} tokens but {q} are being sent.")
    return padding_mask[:, -q:].to(torch.bool).contiguous()


def _forward_reorders(cache: Any, state: _SessionState) -> None:
    """Wrap this cache object's reorder_cache (beam search) so the server's cache follows."""
    ref = weakref.ref(cache)  # no cycle through the bound method
    reorder = type(cache).reorder_cache

    def reorder_cache(beam_idx: torch.LongTensor) -> None:
        reorder(ref(), beam_idx)
        idx = beam_idx.detach().to("cpu", torch.long)
        state.pending_beam = idx if state.pending_beam is None else state.pending_beam[idx]

    cache.reorder_cache = reorder_cache


def _close_later(client: SplitServiceClient, state: _SessionState) -> None:
    client.close_later(state.sid)


def _capture_padding_mask(body: RemoteBody) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            raise SplitError("a split model takes a 2-D padding attention_mask [batch, seq]; a prepared 4-D mask "
                             "cannot be sent to the service.")
        body.padding_mask = mask
    return hook


def make_split_model(model: Any, plan: SplitPlan, service_client: SplitServiceClient, wire: str = "float32",
                     check_weights: bool = True, replay: bool = True, defence: WireDefence | None = None) -> Any:
    """Turn `model` (a full or client-only LlamaForCausalLM, or a PeftModel around one) into a split
    client, in place, and return it. The server-held layers are dropped from it.

    Checks: the plan fits the model; no LoRA module lives in a server layer; the service
    serves the same cut and hidden size; and, if the model still holds the middle layers, that the
    service's weight probe matches them (a different model would silently give wrong results).
    """
    lm = _causal_lm(model)
    if lm.config.num_hidden_layers != plan.num_layers:
        raise SplitError(f"plan is for {plan.num_layers} layers; the model has {lm.config.num_hidden_layers}.")
    held_plan = getattr(lm, "split_plan", None)
    if held_plan is not None and held_plan != plan:
        raise SplitError(f"this client model was loaded for {held_plan}, not {plan}.")
    lora = server_layer_adapters(model, plan)
    if lora:
        raise SplitError(f"{len(lora)} trainable parameters (e.g. {lora[0]}) live in server-held layers; restrict "
                         f"LoRA to the client layers: layers_to_transform={plan.client_layers}.")
    info = service_client.info()
    mine = {"hidden_size": lm.config.hidden_size, "num_layers": plan.num_layers, "front_k": plan.front_k,
            "back_k": plan.back_k}
    theirs = {k: info.get(k) for k in mine}
    if mine != theirs:
        raise SplitError(f"the split service at {service_client.url} serves {theirs}; this client needs {mine}.")
    if check_weights:
        _check_probe(lm, info.get("probe", {}), service_client.url)
    body = RemoteBody(service_client, plan, wire, replay, defence)
    layers = lm.model.layers
    layers[plan.front_k] = body
    for i in list(plan.server_layers)[1:]:
        layers[i] = PassThrough()
    old = getattr(lm, "_split_mask_hook", None)
    if old is not None:
        old.remove()
    lm._split_mask_hook = lm.model.register_forward_pre_hook(_capture_padding_mask(body), with_kwargs=True)
    lm.split_plan = plan
    return model


def _check_probe(lm: nn.Module, probe: dict[str, list[float]], url: str) -> None:
    params = dict(lm.named_parameters())
    for name, values in probe.items():
        mine = params.get(name)
        if mine is None:
            mine = params.get(name.replace(".weight", ".base_layer.weight"))
        if mine is None or mine.device.type == "meta":
            continue  # a client-only model has no middle weights to compare
        ours = mine.detach().flatten()[: len(values)].float().cpu()
        if not torch.allclose(ours, torch.tensor(values), rtol=1e-2, atol=1e-3):
            raise SplitError(f"the split service at {url} holds different weights for {name}: it serves another "
                             "model (or another tiny-model seed) than this client's.")


def remote_body(model: Any) -> RemoteBody:
    lm = _causal_lm(model)
    for layer in lm.model.layers:
        if isinstance(layer, RemoteBody):
            return layer
    raise SplitError("this model is not split (no RemoteBody); call make_split_model first.")


def embed_last_token(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 64,
                     progress: bool = False) -> np.ndarray:
    """(n, hidden) float32 grounding embeddings through the split: the base model's final-norm
    hidden state at each text's last token (adapters off) — the same method as
    `grounding.embed_texts`, which this calls, so split and unsplit catalogues agree."""
    from fellrec_flwr.eval.grounding import embed_texts

    return embed_texts(model, tokenizer, texts, batch_size=batch_size, progress=progress)
