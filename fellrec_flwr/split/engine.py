"""The split-inference engine: the server-held middle layers served to many clients, no transport.

`SplitService` takes the authenticated client key and a request's raw bytes and returns the reply's
bytes, or raises `ApiError` (an HTTP-style status class, a machine-readable code and a message).
A transport (`server_app.split_service`, gRPC) only moves bytes, reads the credentials from its
call metadata and maps `ApiError` to its own status codes.

Requests (payloads are safetensors, see `fellrec_flwr.split.wire`; JSON where marked):

    forward      hidden [B,Q,H] (+ attention_mask [B,Q] bool, position_ids [1|B,Q]) -> hidden [B,Q,H];
                 metadata keep_graph=1 keeps the autograd graph for the matching backward
    backward     the same inputs + grad [B,Q,H] -> grad w.r.t. the input hidden. Stateless
                 (Petals-style): the forward is recomputed unless the graph kept by forward is still
                 cached for this client and the inputs are byte-identical
    infer_create JSON {} -> {"session": id}                     (server-side KV cache)
    infer_step   hidden [B,Q,H], position_ids, attention_mask [B,Q] of the NEW tokens (+ beam_idx),
                 metadata session ("" creates one), past_len (the cache length the client means),
                 close (sessions to drop). The engine keeps each session's key padding mask and
                 builds the attention mask itself (`fellrec_flwr.split.plan.attention_bias`)
    infer_close  JSON {"sessions": [ids]} -> {"closed": n}
    info         hidden size, layer range, dtype, limits, a weight probe, the caller's own stats
                 (service-wide for OPERATOR_KEY) (JSON)

Every request is validated completely before any compute, shapes and limits from the safetensors
header before any tensor is materialised. Compute is serialised with one lock (one model, one
device); a caller may pass a deadline (time.monotonic()), and a request whose deadline passes
while it waits for the lock is refused without computing. Inference sessions belong to the client
key that created them and expire after `session_ttl_s` idle. Each client has a KV quota
(`session_bytes_per_client`): a step that would take a client over it first drops that client's
own least-recently-used sessions, and a single session over it is refused (413); another client's
session is only ever evicted once it has been idle `session_evict_idle_s`, otherwise a full
service answers 503 (the client retries).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fellrec_flwr.split.auth import KEY_METADATA, OPERATOR_KEY, TOKEN_METADATA, verify_token
from fellrec_flwr.split.plan import ServerBody, SplitError, build_server_body, load_server_body, plan_for_model
from fellrec_flwr.split.wire import WireError, decode, encode, read_header

# 3: served over gRPC (payloads unchanged). 2: attention_mask covers the new tokens only; the
# service keeps the keys'.
API_VERSION = 3
_STAT_NAMES = ("requests", "errors", "recomputed_backward", "cached_backward", "compute_s")
_HIDDEN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_INDEX_DTYPES = ("I32", "I64")


@dataclass
class ServiceLimits:
    # one request message; 0 = derived from the model (`max_message_bytes`). The transport refuses a
    # bigger one, and reads any message only once its credentials are checked.
    max_body_bytes: int = 0
    max_batch: int = 512
    max_seq: int = 4096  # tokens per request (prefill); also bounds a session's total length
    max_tokens: int = 1 << 18  # batch x sequence per request
    session_ttl_s: float = 600.0
    session_cache_bytes: int = 2 << 30  # KV caches of all sessions together
    session_bytes_per_client: int = 512 << 20  # one client's sessions together (capped by the above)
    session_evict_idle_s: float = 60.0  # another client's session may be evicted for room after this idle
    max_sessions_per_client: int = 32
    activation_cache_bytes: int = 2 << 30  # graphs kept between forward and backward; 0 = always recompute
    activation_ttl_s: float = 120.0
    # transport (gRPC): a connection lives at most request_timeout_s, then gets GOAWAY and its calls
    # in flight another request_timeout_s; clients reconnect transparently.
    request_timeout_s: float = 300.0
    read_timeout_s: float = 60.0  # an authenticated call's message must arrive within this, else it is cut
    max_workers: int = 16  # server threads; two are always left for health/info (compute waits on one lock)
    max_concurrent_rpcs: int = 64  # calls in flight (incl. those queued for a worker); more: RESOURCE_EXHAUSTED
    max_connections: int = 256  # open connections; more are refused by the library
    keepalive_time_s: float = 60.0  # ping an idle peer this often ...
    keepalive_timeout_s: float = 20.0  # ... and drop the connection if it does not answer within this


# The derived message limit: never below this (small models), never above gRPC's own bound.
_MIN_MESSAGE_BYTES = 16 << 20
_MAX_MESSAGE_BYTES = 256 << 20
_MESSAGE_OVERHEAD = 1 << 20  # safetensors header and metadata


def max_message_bytes(hidden_size: int, limits: ServiceLimits) -> int:
    """The largest request message the service accepts: `limits.max_body_bytes` if set, else the
    biggest request the other limits admit for this model -- a Backward of `max_tokens` positions
    in float32 (hidden + grad, plus mask and ids) -- clamped to [16, 256] MiB. Each worker reading
    an authenticated message may hold this much."""
    if limits.max_body_bytes:
        return limits.max_body_bytes
    per_token = 2 * hidden_size * 4 + 1 + 8  # hidden + grad (float32), attention mask, position id
    return max(_MIN_MESSAGE_BYTES, min(_MAX_MESSAGE_BYTES, limits.max_tokens * per_token + _MESSAGE_OVERHEAD))


class ApiError(Exception):
    """A request the service refuses: HTTP-style status class + machine-readable code + message.

    The status class (400, 401, 403, 404, 409, 413, 500, 503, 504) is what the transport maps to its
    own codes (`server_app.split_service.GRPC_CODES`); clients see the same class and code.
    """

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message}}).encode()


@dataclass
class _Session:
    sid: str
    owner: str
    cache: Any
    batch: int = 0
    past_len: int = 0
    key_mask: torch.Tensor | None = None  # [batch, past_len] bool: which cached keys are real tokens
    nbytes: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class _Activation:
    owner: str
    wire_inputs: dict[str, torch.Tensor]  # as received: backward must match them exactly
    inp: torch.Tensor  # compute-dtype input the graph starts from
    out: torch.Tensor  # output with its graph
    nbytes: int
    created: float = field(default_factory=time.monotonic)


class SplitService:
    """Request handling without a transport: every method takes the authenticated client key and the raw
    request bytes (and optionally a deadline on time.monotonic()), and returns the reply bytes."""

    def __init__(self, body: ServerBody, secret: bytes, limits: ServiceLimits | None = None):
        self.body = body
        self.secret = secret
        self.limits = limits or ServiceLimits()
        self.device = next(body.parameters()).device
        self.dtype = body.compute_dtype  # never a quantised storage dtype (int8/uint8)
        self.hidden_size = body.hidden_size
        self.max_position = int(getattr(body.config, "max_position_embeddings", 1 << 20))
        self._lock = threading.RLock()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # LRU order
        self._activations: OrderedDict[tuple[str, str], _Activation] = OrderedDict()
        self._param_ptrs = {p.data_ptr() for p in body.parameters()}
        self._graph_bytes_per_token = 0.0  # of the last kept graph: predicts whether the next one can be kept
        self.max_message_bytes = max_message_bytes(self.hidden_size, self.limits)
        self.stats: dict[str, float] = dict.fromkeys(_STAT_NAMES, 0)  # service-wide
        self._client_stats: dict[str, dict[str, float]] = {}  # per authenticated client key

    def count(self, client: str | None, name: str, amount: float = 1) -> None:
        """Add to a statistic, service-wide and for `client` (None: a call refused before
        authentication, counted service-wide only)."""
        self.stats[name] += amount
        if client is not None:
            mine = self._client_stats.setdefault(client, dict.fromkeys(_STAT_NAMES, 0))
            mine[name] += amount

    @contextlib.contextmanager
    def _locked(self, deadline: float | None) -> Iterator[None]:
        """The compute lock, waited for until `deadline` (time.monotonic()) at most: a caller that has
        given up is not computed for."""
        if deadline is None:
            self._lock.acquire()
        elif not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ApiError(504, "deadline_exceeded", "the call's deadline passed while it waited behind other "
                                                     "clients' compute; nothing was computed (retry with a "
                                                     "longer timeout).")
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _computing(self, client: str, deadline: float | None = None) -> Iterator[None]:
        """One model, one device: compute is serialised; the time spent is counted (for `client`)."""
        with self._locked(deadline):
            self._expire_activations()  # idle memory goes back before new work
            self._expire_sessions()
            start = time.perf_counter()
            try:
                yield
            finally:
                self.count(client, "compute_s", time.perf_counter() - start)

    # -- info -----------------------------------------------------------------------------

    def info(self, client: str | None = None) -> dict[str, Any]:
        """What a client needs to talk to the service, and its own counts; the operator's key
        (`OPERATOR_KEY`) sees the service-wide counts instead."""
        plan = self.body.plan
        if client == OPERATOR_KEY:
            stats = dict(self.stats)
        else:
            stats = dict(self._client_stats.get(client or "", dict.fromkeys(_STAT_NAMES, 0)))
        return {
            "service": "fellrec-split", "api_version": API_VERSION,
            "model_type": getattr(self.body.config, "model_type", ""),
            "hidden_size": self.hidden_size, "num_layers": plan.num_layers,
            "front_k": plan.front_k, "back_k": plan.back_k,
            "server_layers": [plan.server_layers.start, plan.server_layers.stop - 1],
            "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
            "wire_dtypes": ["float32", "float16", "bfloat16"], "max_position": self.max_position,
            "limits": {**asdict(self.limits), "max_body_bytes": self.max_message_bytes},
            "probe": self.body.probe(), "stats": stats,
            "stats_scope": "service" if client == OPERATOR_KEY else "client",
        }

    def authenticate(self, client_key: str | None, token: str | None) -> str:
        if not client_key or not token:
            raise ApiError(401, "missing_credentials", f"send {KEY_METADATA} and {TOKEN_METADATA} call metadata.")
        if not verify_token(self.secret, client_key, token):
            raise ApiError(403, "bad_credentials", "the token does not match the client key.")
        return client_key

    # -- validation -------------------------------------------------------------------------

    def _parse(self, data: bytes, required: set[str], optional: set[str],
               meta_keys: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        try:
            header, meta = read_header(data)
        except WireError as err:
            raise ApiError(400, "bad_body", str(err)) from None
        except (RecursionError, TypeError, ValueError, KeyError, IndexError):  # deeply nested or odd JSON
            raise ApiError(400, "bad_body", "the safetensors header is malformed (nesting, types or offsets).") \
                from None
        names = set(header)
        if required - names:
            raise ApiError(400, "missing_tensor", f"missing tensors {sorted(required - names)}; "
                                                  f"expected {sorted(required)} (+ optional {sorted(optional)}).")
        if names - required - optional:
            raise ApiError(400, "unexpected_tensor", f"unexpected tensors {sorted(names - required - optional)}.")
        if set(meta) - meta_keys:
            raise ApiError(400, "bad_metadata", f"unexpected metadata keys {sorted(set(meta) - meta_keys)}.")
        allowed = {"hidden": _HIDDEN_DTYPES, "grad": _HIDDEN_DTYPES, "attention_mask": ("BOOL",),
                   "position_ids": _INDEX_DTYPES, "beam_idx": _INDEX_DTYPES}
        for name in sorted(names):
            _check_entry(name, header[name], allowed[name])
        # Shapes and limits from the header, before any tensor is materialised.
        self._check_hidden_shape(header["hidden"]["shape"])
        try:
            tensors, _ = decode(data)
        except WireError as err:
            raise ApiError(400, "bad_body", str(err)) from None
        return tensors, meta

    def _check_hidden_shape(self, shape: list[int] | torch.Size) -> tuple[int, int]:
        if len(shape) != 3:
            raise ApiError(400, "bad_shape", f"hidden must be [batch, seq, hidden]; got shape {list(shape)}.")
        b, q, hs = shape
        if hs != self.hidden_size:
            raise ApiError(400, "bad_hidden_size", f"hidden size {hs} != the model's {self.hidden_size}.")
        if b < 1 or q < 1:
            raise ApiError(400, "bad_shape", f"empty hidden states (shape {list(shape)}).")
        lim = self.limits
        if b > lim.max_batch:
            raise ApiError(413, "batch_too_large", f"batch {b} > limit {lim.max_batch}; split the batch.")
        if q > lim.max_seq:
            raise ApiError(413, "sequence_too_long", f"sequence {q} > limit {lim.max_seq}.")
        if b * q > lim.max_tokens:
            raise ApiError(413, "too_many_tokens", f"batch x seq = {b * q} > limit {lim.max_tokens}.")
        return b, q

    def _check_hidden(self, t: dict[str, torch.Tensor]) -> tuple[int, int]:
        h = t["hidden"]
        b, q = self._check_hidden_shape(h.shape)
        if not torch.isfinite(h).all():
            raise ApiError(400, "non_finite", "hidden contains NaN or inf.")
        return b, q

    def _check_aux(self, t: dict[str, torch.Tensor], b: int, q: int) -> None:
        pos = t["position_ids"]
        if pos.dim() != 2 or pos.shape[0] not in (1, b) or pos.shape[1] != q:
            raise ApiError(400, "bad_position_ids", f"position_ids must be [1 or {b}, {q}]; got {list(pos.shape)}.")
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.max_position):
            raise ApiError(400, "position_out_of_range",
                           f"position ids must be in [0, {self.max_position}); "
                           f"got [{int(pos.min())}, {int(pos.max())}].")
        mask = t.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != (b, q)):
            raise ApiError(400, "bad_attention_mask",
                           f"attention_mask must be [{b}, {q}] (batch, new tokens; the service keeps the mask "
                           f"of the tokens already in a session); got {list(mask.shape)}.")
        grad = t.get("grad")
        if grad is not None:
            if grad.shape != t["hidden"].shape or grad.dtype != t["hidden"].dtype:
                raise ApiError(400, "bad_grad_shape", f"grad must match hidden: {list(t['hidden'].shape)} "
                                                      f"{t['hidden'].dtype}; got {list(grad.shape)} {grad.dtype}.")
            if not torch.isfinite(grad).all():
                raise ApiError(400, "non_finite", "grad contains NaN or inf.")

    @staticmethod
    def _flag(meta: dict[str, str], key: str) -> bool:
        value = meta.get(key, "0")
        if value not in ("0", "1"):
            raise ApiError(400, "bad_metadata", f"metadata {key} must be '0' or '1'; got {value!r}.")
        return value == "1"

    def _to_device(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        h = t["hidden"].to(self.device, self.dtype)
        mask = t.get("attention_mask")
        mask = mask.to(self.device) if mask is not None else None
        return h, mask, t["position_ids"].to(self.device, torch.long)

    # -- training ---------------------------------------------------------------------------

    def forward(self, client: str, data: bytes, deadline: float | None = None) -> bytes:
        t, meta = self._parse(data, {"hidden", "position_ids"}, {"attention_mask"}, {"keep_graph"})
        b, q = self._check_hidden(t)
        self._check_aux(t, b, q)
        keep = self._flag(meta, "keep_graph") and self.limits.activation_cache_bytes > 0
        # a graph over the cap would be dropped once built: do not build it (a large batch could run out
        # of GPU memory first); the client's backward then recomputes
        keep = keep and self._graph_bytes_per_token * b * q <= self.limits.activation_cache_bytes
        h, mask, pos = self._to_device(t)
        out_meta = {}
        with self._computing(client, deadline):
            built = self._graph_forward(h, mask, pos, b * q) if keep else None
            if built is None:
                with torch.no_grad():
                    out = self.body(h, mask, pos)
            else:
                out, counter = built
                # everything the entry keeps alive: saved tensors, the input, the output, the wire copies
                nbytes = counter.add(h, out, *t.values())
                self._graph_bytes_per_token = nbytes / (b * q)
                if nbytes <= self.limits.activation_cache_bytes:
                    aid = secrets.token_hex(8)
                    self._activations[(client, aid)] = _Activation(client, dict(t), h, out, nbytes)
                    self._evict_activations()
                    if (client, aid) in self._activations:
                        out_meta["activation_id"] = aid
        return encode({"hidden": out.detach().to(t["hidden"].dtype)}, out_meta)

    def _graph_forward(self, h: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor,
                       tokens: int) -> tuple[torch.Tensor, "_SavedBytes"] | None:
        """The forward with its graph kept for backward, or None when the device ran out of memory
        building it (the caller then answers without a graph: a 500 would not be retried)."""
        h.requires_grad_(True)
        counter = _SavedBytes(self._param_ptrs)
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack):
                return self.body(h, mask, pos), counter
        except torch.OutOfMemoryError:
            h.requires_grad_(False)
            self._graph_bytes_per_token = max(self._graph_bytes_per_token,
                                              self.limits.activation_cache_bytes / tokens)  # not this size again
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            return None

    def backward(self, client: str, data: bytes, deadline: float | None = None) -> bytes:
        t, meta = self._parse(data, {"hidden", "position_ids", "grad"}, {"attention_mask"}, {"activation_id"})
        b, q = self._check_hidden(t)
        self._check_aux(t, b, q)
        with self._computing(client, deadline):
            entry = self._activations.pop((client, meta.get("activation_id", "")), None)
            if entry is not None and not _same_inputs(entry.wire_inputs, t):
                entry = None  # different inputs: the kept graph does not apply
            grad = t["grad"].to(self.device, self.dtype)
            if entry is not None:
                (g,) = torch.autograd.grad(entry.out, entry.inp, grad)
                self.count(client, "cached_backward")
            else:
                h, mask, pos = self._to_device(t)
                h.requires_grad_(True)
                with torch.enable_grad():
                    out = self.body(h, mask, pos)
                    (g,) = torch.autograd.grad(out, h, grad)
                self.count(client, "recomputed_backward")
        return encode({"grad": g.detach().to(t["hidden"].dtype)}, {"recomputed": "0" if entry else "1"})

    def _expire_activations(self) -> None:
        now = time.monotonic()
        expired = [k for k, a in self._activations.items() if now - a.created > self.limits.activation_ttl_s]
        for key in expired:
            del self._activations[key]
        if expired:
            _release_freed_memory()

    def _evict_activations(self) -> None:
        """Oldest first until the kept graphs fit the cap. Freed at once: a kept graph holds no
        reference cycle (see _SavedBytes.pack), so dropping the entry drops its tensors."""
        cap = self.limits.activation_cache_bytes
        evicted = False
        while self._activations and sum(a.nbytes for a in self._activations.values()) > cap:
            self._activations.popitem(last=False)
            evicted = True
        if evicted:
            _release_freed_memory()

    def activation_bytes(self) -> int:
        return sum(a.nbytes for a in list(self._activations.values()))

    # -- inference sessions -----------------------------------------------------------------

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for sid in [s for s, x in self._sessions.items() if now - x.last_used > self.limits.session_ttl_s]:
            del self._sessions[sid]

    def _new_session(self, client: str) -> _Session:
        owned = [s for s in self._sessions.values() if s.owner == client]
        while len(owned) >= self.limits.max_sessions_per_client:  # drop this client's oldest
            del self._sessions[owned.pop(0).sid]
        session = _Session(secrets.token_urlsafe(16), client, self.body.new_cache())
        self._sessions[session.sid] = session
        return session

    def _kv_bytes(self, batch: int, tokens: int) -> int:
        """The server KV cache of `tokens` positions x `batch` rows (keys and values, all server layers)."""
        cfg = self.body.config
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or self.hidden_size // heads)
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.body.plan.server_layers) * kv_heads * head_dim * elem * batch * tokens

    def _client_quota(self) -> int:
        return min(self.limits.session_bytes_per_client, self.limits.session_cache_bytes)

    def _reserve_session_memory(self, client: str, sid: str, batch: int, tokens: int) -> None:
        """Make room for a session that will hold `tokens` x `batch` KV entries, or refuse.

        Before any compute, so a refused step changes nothing. The client's own sessions go first
        (least recently used); another client's session only when it has idled session_evict_idle_s.
        """
        need, quota, cap = self._kv_bytes(batch, tokens), self._client_quota(), self.limits.session_cache_bytes
        if need > quota:
            raise ApiError(413, "session_too_large",
                           f"this step would grow the session's KV cache to {need} bytes, over the per-client "
                           f"quota of {quota} bytes; use a smaller batch or fewer tokens (or ask the operator "
                           "to raise --session-quota-mb).")
        mine = [s for s in self._sessions.values() if s.owner == client and s.sid != sid]
        while mine and sum(s.nbytes for s in mine) + need > quota:
            del self._sessions[mine.pop(0).sid]  # LRU order: this client's least recently used first
        others = [s for s in self._sessions.values() if s.sid != sid]
        now = time.monotonic()
        idle = [s for s in others if s.owner != client and now - s.last_used >= self.limits.session_evict_idle_s]
        while idle and sum(s.nbytes for s in others) + need > cap:
            victim = idle.pop(0)
            del self._sessions[victim.sid]
            others.remove(victim)
        if sum(s.nbytes for s in others) + need > cap:
            raise ApiError(503, "service_full",
                           f"the service's KV memory ({cap} bytes) is taken by other clients' active sessions; "
                           "retry shortly (the client does, with back-off).")

    def _owned(self, client: str, sid: str) -> _Session:
        session = self._sessions.get(sid)
        if session is None or not secrets.compare_digest(session.owner, client):
            # one answer for "never existed", "expired" and "someone else's": no oracle
            raise ApiError(404, "unknown_session", f"no inference session {sid[:32]!r} for this client "
                                                   "(expired, evicted, closed, or the service restarted).")
        return session

    def _close(self, client: str, sids: list[str]) -> int:
        closed = 0
        for sid in sids:
            session = self._sessions.get(sid)
            if session is not None and session.owner == client:
                del self._sessions[sid]
                closed += 1
        return closed

    def infer_create(self, client: str, data: bytes, deadline: float | None = None) -> bytes:
        _parse_json(data, set())
        with self._locked(deadline):
            self._expire_sessions()
            session = self._new_session(client)
        return json.dumps({"session": session.sid, "ttl_s": self.limits.session_ttl_s}).encode()

    def infer_close(self, client: str, data: bytes, deadline: float | None = None) -> bytes:
        obj = _parse_json(data, {"sessions"})
        sids = obj.get("sessions", [])
        if not isinstance(sids, list) or not all(isinstance(s, str) for s in sids):
            raise ApiError(400, "bad_json", "'sessions' must be a list of session ids.")
        with self._locked(deadline):
            closed = self._close(client, sids)
        return json.dumps({"closed": closed}).encode()

    def infer_step(self, client: str, data: bytes, deadline: float | None = None) -> bytes:
        t, meta = self._parse(data, {"hidden", "position_ids"}, {"attention_mask", "beam_idx"},
                              {"session", "past_len", "close"})
        b, q = self._check_hidden(t)
        try:
            past = int(meta.get("past_len", "0"))
        except ValueError:
            raise ApiError(400, "bad_metadata", f"past_len must be an integer; got {meta['past_len']!r}.") from None
        if past < 0 or past + q > self.limits.max_seq:
            raise ApiError(413 if past >= 0 else 400, "sequence_too_long",
                           f"past_len {past} + {q} new tokens exceeds the session limit {self.limits.max_seq}.")
        self._check_aux(t, b, q)
        beam = t.get("beam_idx")
        if beam is not None and (beam.dim() != 1 or beam.shape[0] != b or int(beam.min()) < 0):
            raise ApiError(400, "bad_beam_idx", f"beam_idx must be [{b}] (one source row per new row), values >= 0.")
        h, mask, pos = self._to_device(t)
        sid = meta.get("session", "")
        with self._computing(client, deadline):
            self._close(client, [s for s in meta.get("close", "").split(",") if s])
            if not sid:
                if past != 0:
                    raise ApiError(409, "session_out_of_sync", f"a new session starts at past_len 0, not {past}.")
                session = self._new_session(client)
            else:
                session = self._owned(client, sid)
            if past != session.past_len:
                raise ApiError(409, "session_out_of_sync",
                               f"the session holds {session.past_len} tokens; the request says past_len={past}.")
            # beam_idx may change the number of rows (a search that keeps a varying number of beams):
            # row i of the reordered cache is old row beam_idx[i]
            if beam is not None and int(beam.max()) >= session.batch:  # a new session has no rows yet
                raise ApiError(400, "bad_beam_idx", f"beam_idx values must be in [0, {session.batch}) "
                                                    "(the session's rows).")
            if past and beam is None and b != session.batch:
                raise ApiError(400, "bad_shape", f"batch {b} differs from the session's batch {session.batch}; "
                                                 "send beam_idx to select or repeat rows.")
            try:
                self._reserve_session_memory(client, session.sid, b, past + q)
            except ApiError:
                if not past:  # a session created by this very request holds nothing yet
                    self._sessions.pop(session.sid, None)
                raise
            new_keys = mask if mask is not None else torch.ones(b, q, dtype=torch.bool, device=self.device)
            try:
                with torch.no_grad():
                    old_keys = session.key_mask
                    if beam is not None:
                        idx = beam.to(self.device, torch.long)
                        session.cache.reorder_cache(idx)
                        old_keys = old_keys[idx] if old_keys is not None else None
                    key_mask = new_keys if old_keys is None else torch.cat([old_keys, new_keys], dim=1)
                    out = self.body(h, key_mask, pos, cache=session.cache, past_len=past)
            except Exception:
                del self._sessions[session.sid]  # a half-updated cache is useless
                raise
            session.key_mask = key_mask
            session.batch, session.past_len, session.last_used = b, past + q, time.monotonic()
            session.nbytes = _cache_bytes(session.cache)
            self._sessions.move_to_end(session.sid)
            self._enforce_session_memory(session)
        return encode({"hidden": out.to(t["hidden"].dtype)},
                      {"session": session.sid, "past_len": str(session.past_len)})

    def _enforce_session_memory(self, current: _Session) -> None:
        """After the step, with the real sizes: only ever this client's own sessions are dropped."""
        quota = self._client_quota()
        mine = [s for s in self._sessions.values() if s.owner == current.owner and s.sid != current.sid]
        while mine and sum(s.nbytes for s in mine) + current.nbytes > quota:
            del self._sessions[mine.pop(0).sid]
        if current.nbytes > quota:
            del self._sessions[current.sid]
            raise ApiError(413, "session_too_large",
                           f"this session's KV cache ({current.nbytes} bytes) exceeds the per-client quota ({quota}).")

    def session_count(self) -> int:
        return len(self._sessions)  # no lock: a health check must answer while compute runs


class _SavedBytes:
    """Bytes a kept graph holds: the storages of every tensor autograd saves for backward, plus
    those passed to `add` (input, output, wire tensors), each storage counted once and whole (a
    saved view keeps its entire storage alive). Parameters are excluded: they are not extra memory."""

    def __init__(self, param_ptrs: set[int]):
        self.param_ptrs = param_ptrs
        self.storages: dict[int, int] = {}

    def _count(self, x: torch.Tensor) -> None:
        try:
            storage = x.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return
        if ptr not in self.param_ptrs:
            self.storages[ptr] = max(self.storages.get(ptr, 0), storage.nbytes())

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        self._count(x)
        # A detached alias, not `x` itself: returning a saved *output* would let the graph hold the
        # tensor whose grad_fn is that graph, a reference cycle only the garbage collector frees
        # (which is how kept graphs used to outlive their eviction). Autograd re-attaches grad_fn
        # on unpack, and the alias shares the storage, so nothing is copied.
        return x.detach()

    def add(self, *tensors: torch.Tensor) -> int:
        for t in tensors:
            self._count(t)
        return sum(self.storages.values())


def _unpack(x: torch.Tensor) -> torch.Tensor:
    return x


def _libc_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, so RSS would not fall
    after an eviction even though the memory is free)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "BOOL": 1, "I32": 4, "I64": 8}
_MAX_DIMS = 4


def _check_entry(name: str, entry: dict[str, Any], dtypes: Any) -> None:
    """One safetensors header entry: an allowed dtype, a small rank, and offsets that span exactly
    the bytes the shape needs (so decoding allocates no more than the body already holds)."""
    dtype = entry.get("dtype")
    if dtype not in dtypes:
        raise ApiError(400, "bad_dtype", f"{name} has dtype {str(dtype)[:16]}; allowed: {', '.join(dtypes)}.")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if len(shape) > _MAX_DIMS:
        raise ApiError(400, "bad_shape", f"{name} has {len(shape)} dimensions; at most {_MAX_DIMS}.")
    if not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) or offsets[0] > offsets[1]:
        raise ApiError(400, "bad_body", f"tensor {name!r} has malformed data_offsets.")
    numel = 1
    for d in shape:
        numel *= d
    if numel * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise ApiError(400, "bad_body", f"tensor {name!r}: its shape needs {numel * _DTYPE_BYTES[dtype]} bytes, "
                                        f"its offsets span {offsets[1] - offsets[0]}.")


def _same_inputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    keys = ("hidden", "position_ids", "attention_mask")
    for k in keys:
        x, y = a.get(k), b.get(k)
        if (x is None) != (y is None):
            return False
        if x is not None and (x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y)):
            return False
    return True


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


_MAX_JSON_BYTES = 1 << 16


def _parse_json(data: bytes, allowed: set[str]) -> dict[str, Any]:
    if not data:
        return {}
    if len(data) > _MAX_JSON_BYTES:
        raise ApiError(413, "body_too_large", f"a JSON body is at most {_MAX_JSON_BYTES} bytes.")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, "bad_json", f"body is not JSON: {err}") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "body is nested too deeply.") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object.")
    if set(obj) - allowed:
        raise ApiError(400, "bad_json", f"unexpected keys {sorted(set(obj) - allowed)}.")
    return obj


def make_body(model: Any, front_k: int, back_k: int, device: str = "cpu", dtype: str | None = None,
              work_dir: str | Path | None = None) -> ServerBody:
    """A ServerBody from a ServerBody, a full model object, or a checkpoint path / GGUF."""
    if isinstance(model, ServerBody):
        body = model
    elif isinstance(model, (str, Path)):
        from fellrec_flwr.model.loading import resolve_checkpoint
        from fellrec_flwr.paths import cache_root

        path = resolve_checkpoint(model, work_dir or cache_root())
        return load_server_body(path, front_k, back_k, dtype=dtype, device=device)
    else:
        body = build_server_body(model, plan_for_model(model, front_k, back_k))
    if (body.plan.front_k, body.plan.back_k) != (front_k, back_k):
        raise SplitError(f"the body was built for front_k={body.plan.front_k}, back_k={body.plan.back_k}, "
                         f"not {front_k}, {back_k}.")
    from fellrec_flwr.model.precision import cast_model
    from fellrec_flwr.split.plan import _torch_dtype

    return cast_model(body, device, _torch_dtype(dtype)).eval()  # rotary frequencies stay float32

