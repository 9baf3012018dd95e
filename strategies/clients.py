"""Which client is behind which node: what a strategy's per-client state is keyed by.

Flower addresses nodes by node id, and a node id changes when a SuperNode restarts (or a run
resumes); the client it serves does not. Every reply carries the client's "client-key" (its
partition id), and a node the strategy has not heard from yet is asked for it with a QUERY
message before it is sent a personal adapter. Flower 1.42 has no notion of a client identity
that outlives a node id, hence this registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

CLIENT_KEY = "client-key"


class ClientRegistry:
    def __init__(self) -> None:
        self.node_to_key: dict[int, int] = {}
        self.unidentifiable: set[int] = set()  # asked, never answered with a key: get the fallback arrays
        self._warned_missing_key = False

    def key_of(self, metrics: Mapping[str, Any], node_id: int) -> int:
        """A reply's "client-key" metric; falls back to the node id (with one warning)."""
        if CLIENT_KEY in metrics:
            return int(metrics[CLIENT_KEY])
        if not self._warned_missing_key:
            log(WARNING, "Replies carry no %r metric: keying clients by node id (not stable across restarts).",
                CLIENT_KEY)
            self._warned_missing_key = True
        return int(node_id)

    def remember(self, node_id: int, key: int) -> None:
        for old in [n for n, k in self.node_to_key.items() if k == key and n != node_id]:
            del self.node_to_key[old]  # the client came back under a new node id
        self.node_to_key[node_id] = key
        self.unidentifiable.discard(node_id)

    def identify(self, grid: Grid, node_ids: Iterable[int], server_round: int, configrecord_key: str,
                 timeout: float) -> None:
        """Ask the nodes whose client is not known yet for their client-key (one QUERY message each).

        A ClientApp without a query handler answers with an error; such nodes are remembered as
        unidentifiable and get the fallback arrays, as new clients do.
        """
        unknown = [n for n in node_ids if n not in self.node_to_key and n not in self.unidentifiable]
        if not unknown:
            return
        queries = [
            Message(content=RecordDict({configrecord_key: ConfigRecord({"server-round": server_round,
                                                                        "want": CLIENT_KEY})}),
                    message_type=MessageType.QUERY, dst_node_id=node_id)
            for node_id in unknown
        ]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            if reply.has_error() or not reply.content.metric_records:
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            if CLIENT_KEY in metrics:
                self.remember(reply.metadata.src_node_id, int(metrics[CLIENT_KEY]))  # type: ignore[arg-type]
        missing = [n for n in unknown if n not in self.node_to_key]
        if missing:
            log(WARNING, "Could not identify nodes %s (no query reply with %r); they get the fallback arrays.",
                missing, CLIENT_KEY)
            self.unidentifiable.update(missing)
        log(INFO, "Identified %d of %d new nodes by %r.", len(unknown) - len(missing), len(unknown), CLIENT_KEY)

    def state(self) -> dict[str, Any]:
        return {"node_to_key": dict(self.node_to_key)}

    def load(self, state: Mapping[str, Any]) -> None:
        self.node_to_key = {int(n): int(k) for n, k in state["node_to_key"].items()}
