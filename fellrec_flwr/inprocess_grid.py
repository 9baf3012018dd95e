"""An in-process Flower Grid: calls a ClientApp synchronously, no Ray, no SuperLink.

Used by the tests and by `bench/quality.py` (the quality numbers do not depend on the
transport, and one process keeps runs deterministic and cheap).

Follows ../shared/notes/flower-1.42.md section 8, plus failure injection:
- ``fail`` {server-round: {partition ids}}: those clients answer with an error reply
  (as Flower does when a ClientApp raises); a ClientApp that raises does the same;
- ``drop`` {server-round: {partition ids}}: no reply at all (a timeout);
- ``connected``: the node ids ``get_node_ids`` reports (default: all), to test waiting.
Every message sent is kept in ``sent`` for assertions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid


class InProcessGrid(Grid):
    def __init__(
        self,
        client_app: ClientApp,
        num_clients: int,
        run_config: Mapping[str, Any] | None = None,
        first_node_id: int = 100,
        fail: Mapping[int, set[int]] | None = None,
        drop: Mapping[int, set[int]] | None = None,
        connected: list[int] | None = None,
        node_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.client_app = client_app
        self.fail = {int(r): set(p) for r, p in (fail or {}).items()}
        self.drop = {int(r): set(p) for r, p in (drop or {}).items()}
        self.partition_of = {first_node_id + 7 * i: i for i in range(num_clients)}
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": pid, "num-partitions": num_clients, **(node_config or {})},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node_id, pid in self.partition_of.items()
        }
        self.connected = connected
        self.sent: list[Message] = []
        self._count = 0

    def node_of(self, partition_id: int) -> int:
        return next(n for n, p in self.partition_of.items() if p == partition_id)

    def sent_to(self, partition_id: int, message_type: str, server_round: int) -> Message:
        node_id = self.node_of(partition_id)
        for m in self.sent:
            if (m.metadata.dst_node_id == node_id and m.metadata.message_type == message_type
                    and m.content["config"]["server-round"] == server_round):
                return m
        raise KeyError(f"no {message_type} message to partition {partition_id} in round {server_round}")

    # --- Grid API -------------------------------------------------------------
    def set_run(self, run: Any) -> None:  # noqa: D102
        pass

    @property
    def run(self) -> Any:  # noqa: D102
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts) if self.connected is None else list(self.connected)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            self._count += 1
            # Metadata.message_id has no setter; Flower's own grids write it like this.
            message.metadata.__dict__["_message_id"] = f"m{self._count}"
            self.sent.append(message)
            node_id = message.metadata.dst_node_id
            pid = self.partition_of[node_id]
            config = message.content.config_records.get("config")
            server_round = int(config["server-round"]) if config and "server-round" in config else -1
            is_train = message.metadata.message_type == "train"
            if is_train and pid in self.drop.get(server_round, set()):
                continue
            if is_train and pid in self.fail.get(server_round, set()):
                replies.append(Message(Error(code=0, reason="simulated failure"), reply_to=message))
                continue
            try:
                replies.append(self.client_app(message, self.contexts[node_id]))
            except Exception as err:  # Flower turns a raising ClientApp into an error reply
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message))
        return replies
