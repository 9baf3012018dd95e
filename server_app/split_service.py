"""The split-inference service: runs the server-held middle layers for many clients over HTTP.

    python -m server_app.split_service --model PATH|GGUF|tiny --front-k 1 --back-k 1 \\
        --secret-file secret.txt [--device cuda] [--port 8470] [--tls-cert c.pem --tls-key k.pem]

Endpoints (all POST bodies and tensor replies are safetensors, see `fellrec_flwr.split.wire`):

    GET  /v1/health          liveness (no credentials needed; never waits for the compute lock)
    GET  /v1/info            hidden size, layer range, dtype, limits, a weight probe (needs a token)
    POST /v1/forward         hidden [B,Q,H] (+ attention_mask [B,Q] bool, position_ids [1|B,Q])
                             -> hidden [B,Q,H]; metadata keep_graph=1 keeps the autograd graph
                             for the matching backward (an optimisation, see below)
    POST /v1/backward        the same inputs + grad [B,Q,H] -> grad w.r.t. the input hidden.
                             Stateless (Petals-style): the forward is recomputed unless the graph
                             kept by /v1/forward is still cached for this client and the inputs
                             are byte-identical.
    POST /v1/infer/create    JSON {} -> {"session": id}          (server-side KV cache)
    POST /v1/infer/step      hidden [B,Q,H], position_ids, attention_mask [B,Q] of the NEW tokens
                             (+ beam_idx) with metadata session, past_len (the cache length the
                             client means). The service keeps each session's key padding mask and
                             builds the attention mask itself (`fellrec_flwr.split.plan.attention_bias`).
                             (session "" creates one; close= lists sessions to drop)
    POST /v1/infer/close     JSON {"sessions": [ids]}

Every request carries X-Client-Key / X-Client-Token (HMAC, see `fellrec_flwr.split.auth`) and is
validated completely before any compute; a bad request gets a JSON error
``{"error": {"code": ..., "message": ...}}`` with an HTTP status, and the service keeps serving.
Compute is serialised with one lock (one model, one device); parsing and validation run in the
request threads, and shapes and limits are checked from the safetensors header before any tensor
is materialised. Inference sessions belong to the client key that created them and expire after
`session_ttl_s` idle. Each client has a KV quota (`session_bytes_per_client`): a step that would
take a client over it first drops that client's own least-recently-used sessions, and a single
session over it is refused (413); another client's session is only ever evicted once it has been
idle `session_evict_idle_s`, otherwise a full service answers 503 (the client retries).

The transport is the standard library's HTTP server, hardened (see docs/security.md): TCP_NODELAY
on every connection, a whole-request deadline, obs-fold headers and GET bodies refused, 500s that
never carry internals, a configurable listen backlog.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import logging
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fellrec_flwr.paths import default_secret_file  # noqa: F401 (where a simulation's secret lives; re-exported)
from fellrec_flwr.split.plan import ServerBody, SplitError, build_server_body, load_server_body, plan_for_model
from fellrec_flwr.split.auth import KEY_HEADER, TOKEN_HEADER, load_secret, server_ssl_context, verify_token
from fellrec_flwr.split.wire import CONTENT_TYPE, WireError, decode, encode, read_header

log = logging.getLogger("fellrec.split_service")

API_VERSION = 2  # 2: attention_mask covers the new tokens only; the service keeps the keys'
_HIDDEN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_INDEX_DTYPES = ("I32", "I64")


@dataclass
class ServiceLimits:
    max_body_bytes: int = 512 << 20  # one request body
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
    socket_timeout_s: float = 120.0  # per receive: idle keep-alive connections are dropped
    request_timeout_s: float = 300.0  # to send a whole request, and to take a whole reply: slow drips are cut
    listen_backlog: int = 128  # pending connections the kernel queues before refusing


class ApiError(Exception):
    """A request the service refuses: HTTP status + machine-readable code + message."""

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
    """Request handling without HTTP: every method takes the authenticated client key and raw body."""

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
        self.stats: dict[str, float] = {"requests": 0, "errors": 0, "recomputed_backward": 0, "cached_backward": 0,
                                       "compute_s": 0.0}

    @contextlib.contextmanager
    def _computing(self) -> Iterator[None]:
        """One model, one device: compute is serialised; the time spent is counted."""
        with self._lock:
            self._expire_activations()  # idle memory goes back before new work
            self._expire_sessions()
            start = time.perf_counter()
            try:
                yield
            finally:
                self.stats["compute_s"] += time.perf_counter() - start

    # -- info -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        plan = self.body.plan
        return {
            "service": "fellrec-split", "api_version": API_VERSION,
            "model_type": getattr(self.body.config, "model_type", ""),
            "hidden_size": self.hidden_size, "num_layers": plan.num_layers,
            "front_k": plan.front_k, "back_k": plan.back_k,
            "server_layers": [plan.server_layers.start, plan.server_layers.stop - 1],
            "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
            "wire_dtypes": ["float32", "float16", "bfloat16"], "max_position": self.max_position,
            "limits": asdict(self.limits), "probe": self.body.probe(), "stats": dict(self.stats),
        }

    def authenticate(self, client_key: str | None, token: str | None) -> str:
        if not client_key or not token:
            raise ApiError(401, "missing_credentials", f"send {KEY_HEADER} and {TOKEN_HEADER} headers.")
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

    def forward(self, client: str, data: bytes) -> bytes:
        t, meta = self._parse(data, {"hidden", "position_ids"}, {"attention_mask"}, {"keep_graph"})
        b, q = self._check_hidden(t)
        self._check_aux(t, b, q)
        keep = self._flag(meta, "keep_graph") and self.limits.activation_cache_bytes > 0
        h, mask, pos = self._to_device(t)
        out_meta = {}
        with self._computing():
            if not keep:
                with torch.no_grad():
                    out = self.body(h, mask, pos)
            else:
                h.requires_grad_(True)
                counter = _SavedBytes(self._param_ptrs)
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack):
                    out = self.body(h, mask, pos)
                # everything the entry keeps alive: saved tensors, the input, the output, the wire copies
                nbytes = counter.add(h, out, *t.values())
                if nbytes <= self.limits.activation_cache_bytes:
                    aid = secrets.token_hex(8)
                    self._activations[(client, aid)] = _Activation(client, dict(t), h, out, nbytes)
                    self._evict_activations()
                    if (client, aid) in self._activations:
                        out_meta["activation_id"] = aid
        return encode({"hidden": out.detach().to(t["hidden"].dtype)}, out_meta)

    def backward(self, client: str, data: bytes) -> bytes:
        t, meta = self._parse(data, {"hidden", "position_ids", "grad"}, {"attention_mask"}, {"activation_id"})
        b, q = self._check_hidden(t)
        self._check_aux(t, b, q)
        with self._computing():
            entry = self._activations.pop((client, meta.get("activation_id", "")), None)
            if entry is not None and not _same_inputs(entry.wire_inputs, t):
                entry = None  # different inputs: the kept graph does not apply
            grad = t["grad"].to(self.device, self.dtype)
            if entry is not None:
                (g,) = torch.autograd.grad(entry.out, entry.inp, grad)
                self.stats["cached_backward"] += 1
            else:
                h, mask, pos = self._to_device(t)
                h.requires_grad_(True)
                with torch.enable_grad():
                    out = self.body(h, mask, pos)
                    (g,) = torch.autograd.grad(out, h, grad)
                self.stats["recomputed_backward"] += 1
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

    def infer_create(self, client: str, data: bytes) -> bytes:
        _parse_json(data, set())
        with self._lock:
            self._expire_sessions()
            session = self._new_session(client)
        return json.dumps({"session": session.sid, "ttl_s": self.limits.session_ttl_s}).encode()

    def infer_close(self, client: str, data: bytes) -> bytes:
        obj = _parse_json(data, {"sessions"})
        sids = obj.get("sessions", [])
        if not isinstance(sids, list) or not all(isinstance(s, str) for s in sids):
            raise ApiError(400, "bad_json", "'sessions' must be a list of session ids.")
        with self._lock:
            closed = self._close(client, sids)
        return json.dumps({"closed": closed}).encode()

    def infer_step(self, client: str, data: bytes) -> bytes:
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
        with self._computing():
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


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

_POST_ROUTES: dict[str, Callable[[SplitService, str, bytes], bytes]] = {
    "/v1/forward": SplitService.forward,
    "/v1/backward": SplitService.backward,
    "/v1/infer/create": SplitService.infer_create,
    "/v1/infer/step": SplitService.infer_step,
    "/v1/infer/close": SplitService.infer_close,
}


_GET_ROUTES = ("/v1/health", "/v1/info")


def _nodelay(sock: socket.socket) -> None:
    """Small requests and replies go out at once: without this, Nagle's algorithm holds a reply's
    body until the peer's delayed ACK of its headers (~40 ms per keep-alive request)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not TCP (a test's socketpair): nothing to tune
        pass


def _printable(value: Any, limit: int = 64) -> str:
    """A header value fit for one log line: control characters escaped, length capped."""
    return repr(str(value)[:limit])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every reply carries Content-Length
    server: "_HTTPServer"

    def setup(self) -> None:
        self.timeout = self.server.service.limits.socket_timeout_s
        super().setup()
        self.server.track(self.connection, True)
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()  # here, in the request thread, not in the accept loop
            except (OSError, ssl.SSLError):
                self.server.track(self.connection, False)  # finish() does not run when setup fails
                raise

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def handle_one_request(self) -> None:
        # A whole-request deadline (the socket timeout only bounds each receive, so a sender
        # dripping a byte at a time would hold this thread forever): the server's watchdog shuts
        # the connection down if this request is not answered in time.
        self.server.arm(self.connection, time.monotonic() + self.server.service.limits.request_timeout_s)
        try:
            super().handle_one_request()
        finally:
            self.server.arm(self.connection, None)

    def log_message(self, fmt: str, *args: Any) -> None:  # route the access log to logging
        log.debug("%s " + fmt, self.address_string(), *(_printable(a, 200) for a in args))

    def _reply(self, status: int, body: bytes, ctype: str = "application/json", close: bool = False) -> None:
        self.server.arm(self.connection, time.monotonic() + self.server.service.limits.request_timeout_s)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, err: ApiError, close: bool = False) -> None:
        self.server.service.stats["errors"] += 1
        log.info("refused %s from %s: %s %s", _printable(self.path), _printable(self.headers.get(KEY_HEADER, "?")),
                 err.code, err.message)
        self._reply(err.status, err.body(), close=close)

    def _check_headers(self, may_have_body: bool) -> None:
        """Refuse what a proxy in front might read differently from us (request smuggling shapes)."""
        for name, value in self.headers.items():
            if "\r" in value or "\n" in value:  # obs-fold: a header continued on the next line
                raise ApiError(400, "bad_header", f"header {_printable(name, 32)} is folded across lines "
                                                  "(obsolete line folding is not accepted).")
        if self.headers.get("Transfer-Encoding") is not None:
            raise ApiError(411 if may_have_body else 400, "length_required",
                           "Transfer-Encoding is not accepted; send a Content-Length header.")
        if len(self.headers.get_all("Content-Length") or []) > 1:
            raise ApiError(400, "bad_content_length", "more than one Content-Length header.")
        if not may_have_body and self.headers.get("Content-Length", "0").strip() not in ("", "0"):
            raise ApiError(400, "unexpected_body", f"{self.command} requests carry no body.")

    def do_GET(self) -> None:
        service = self.server.service
        try:
            self._check_headers(may_have_body=False)
        except ApiError as err:
            return self._error(err, close=True)  # an unread body must not be parsed as the next request
        if self.path == "/v1/health":  # liveness only: nothing about clients, and never the compute lock
            self._reply(200, json.dumps({"status": "ok"}).encode())
        elif self.path == "/v1/info":
            try:
                service.authenticate(self.headers.get(KEY_HEADER), self.headers.get(TOKEN_HEADER))
            except ApiError as err:
                return self._error(err)
            self._reply(200, json.dumps(service.info()).encode())
        elif self.path in _POST_ROUTES:
            self._error(ApiError(405, "method_not_allowed", f"{self.path} takes POST."))
        else:
            self._error(ApiError(404, "not_found", f"no endpoint {_printable(self.path)}."))

    def do_POST(self) -> None:
        service = self.server.service
        service.stats["requests"] += 1
        # Until the body is read, an error must close the connection: the unread body would
        # otherwise be parsed as the next request.
        route = _POST_ROUTES.get(self.path)
        if route is None:
            err = ApiError(405, "method_not_allowed", f"{self.path} takes GET.") if self.path in _GET_ROUTES \
                else ApiError(404, "not_found", f"no endpoint {_printable(self.path)}.")
            return self._error(err, close=True)
        try:
            self._check_headers(may_have_body=True)
            client = service.authenticate(self.headers.get(KEY_HEADER), self.headers.get(TOKEN_HEADER))
            length = self._content_length(service.limits.max_body_bytes)
        except ApiError as err:
            return self._error(err, close=True)
        try:
            data = self.rfile.read(length)
        except OSError:  # the deadline watchdog or the socket timeout ended a slow sender
            self.close_connection = True
            return
        if len(data) != length:  # the client went away mid-body
            self.close_connection = True
            return
        # The deadline bounds what the peer controls (sending the request, taking the reply), not
        # the compute or the wait for the compute lock behind other clients.
        self.server.arm(self.connection, None)
        try:
            reply = route(service, client, data)
        except ApiError as err:
            return self._error(err)
        except Exception:  # a bug or an out-of-memory: logged in full here, never sent to the client
            incident = secrets.token_hex(4)
            log.exception("internal error %s on %s", incident, self.path)
            return self._error(ApiError(500, "internal_error",
                                        f"the service failed on this request (incident {incident}; "
                                        "the operator finds it in the service log)."))
        ctype = "application/json" if self.path in ("/v1/infer/create", "/v1/infer/close") else CONTENT_TYPE
        self._reply(200, reply, ctype)

    def _content_length(self, cap: int) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise ApiError(411, "length_required", "send a Content-Length header (chunked bodies are not accepted).")
        if not raw.strip().isdigit():
            raise ApiError(400, "bad_content_length", f"Content-Length {_printable(raw, 32)} is not an integer.")
        length = int(raw)
        if length > cap:
            raise ApiError(413, "body_too_large", f"body of {length} bytes exceeds the limit of {cap}.")
        return length


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: SplitService, ssl_context: ssl.SSLContext | None):
        self.service = service
        self.ssl_context = ssl_context
        self.request_queue_size = service.limits.listen_backlog  # read by server_activate's listen()
        self._connections: dict[socket.socket, float | None] = {}  # -> request deadline (None: idle)
        self._conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        _nodelay(sock)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # failed TLS handshakes and dropped connections: not worth a traceback on stderr
        log.info("connection from %s ended with an error: %s", client_address, sys.exc_info()[1])

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._conn_lock:
            if add:
                self._connections[conn] = None
            else:
                self._connections.pop(conn, None)

    def arm(self, conn: socket.socket, deadline: float | None) -> None:
        with self._conn_lock:
            if conn in self._connections:
                self._connections[conn] = deadline

    def service_actions(self) -> None:
        """Called by serve_forever every poll interval: end requests past their deadline."""
        now = time.monotonic()
        with self._conn_lock:
            late = [c for c, d in self._connections.items() if d is not None and d < now]
            for conn in late:
                self._connections[conn] = None
        for conn in late:
            log.info("dropping a connection whose request exceeded %.0f s", self.service.limits.request_timeout_s)
            _shutdown(conn)

    def close_connections(self) -> None:
        """Drop open keep-alive connections so clients notice a stop at once."""
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            _shutdown(conn)


def _shutdown(conn: socket.socket) -> None:
    try:  # the plain socket's shutdown, also under TLS: the handler thread may be inside a read
        socket.socket.shutdown(conn, socket.SHUT_RDWR)
    except OSError:
        pass


@dataclass
class ServiceHandle:
    url: str
    host: str
    port: int
    service: SplitService
    _server: _HTTPServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=10)


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
    from fellrec_flwr.split.plan import _torch_dtype

    return body.to(device=device, dtype=_torch_dtype(dtype)).eval()


def start_service(model: Any, secret: bytes, front_k: int = 1, back_k: int = 1, host: str = "127.0.0.1",
                  port: int = 0, device: str = "cpu", dtype: str | None = None, limits: ServiceLimits | None = None,
                  tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                  work_dir: str | Path | None = None) -> ServiceHandle:
    """Serve the middle layers of `model` (ServerBody, full model, or checkpoint path) in a thread."""
    body = make_body(model, front_k, back_k, device, dtype, work_dir)
    service = SplitService(body, secret, limits)
    ctx = server_ssl_context(tls_cert, tls_key) if tls_cert and tls_key else None
    if bool(tls_cert) != bool(tls_key):
        raise SplitError("TLS needs both --tls-cert and --tls-key.")
    server = _HTTPServer((host, port), service, ctx)
    bound_host, bound_port = server.server_address[:2]
    url = f"{'https' if ctx else 'http'}://{bound_host}:{bound_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"split-service:{bound_port}", daemon=True)
    thread.start()
    log.info("split service at %s (%s)", url, body.plan.describe())
    return ServiceHandle(url, str(bound_host), int(bound_port), service, server, thread)


def start_service_for_run(cfg: Any, secret_file: str | Path | None = None) -> ServiceHandle:
    """Simulation convenience: serve this run's middle layers on loopback.

    Only the middle layers are read from the checkpoint (`model_parts.load_server_part`; 8/4-bit
    and `cuda:N` as configured). The secret is read from `secret_file` (default
    `<cache>/split-secret.txt`, created with mode 600 if absent); simulated clients on the same
    machine derive their tokens from it. In a deployment run the service as its own process.
    """
    from fellrec_flwr.model.parts import load_server_part
    from fellrec_flwr.runtime import prepare_data
    from fellrec_flwr.split.auth import write_secret

    path = Path(secret_file or default_secret_file())
    if not path.exists():
        write_secret(path)
    data = prepare_data(cfg)  # the tiny model's tokenizer and converted checkpoints live in this folder
    body = load_server_part(cfg.model, data.titles, data.path, cfg.split.front_k, cfg.split.back_k)
    device = next(body.parameters()).device
    return start_service(body, load_secret(path), cfg.split.front_k, cfg.split.back_k, device=str(device))


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
                   help="seconds a client has to send a whole request (and to take a whole reply)")
    p.add_argument("--backlog", type=int, default=lim.listen_backlog, help="listen backlog (pending connections)")
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
                           request_timeout_s=args.request_timeout, listen_backlog=args.backlog,
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
