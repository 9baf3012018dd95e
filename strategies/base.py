"""What this project's strategies add to Flower's FedAvg, and why Flower's own code does not do it.

``StrategyBase`` is a ``flwr.serverapp.strategy.FedAvg``. From Flower it keeps the round
loop (``Strategy.start``: configure, send, aggregate, evaluate, the ``Result`` and its
logs), the constructor's sampling knobs, ``summary()``, the weighted means
(``aggregate_arrayrecords`` / ``aggregate_metricrecords``) and the reply checks
(``validate_message_reply_consistency``). What is here, each for a need Flower 1.42 does
not meet:

- ``configure_train`` / ``configure_evaluate`` build one message per node (steps
  ``arrays_for_node``, ``add_train_config``): FedAvg sends all nodes one shared RecordDict,
  but personalised strategies send each client its own adapter and FELLRec its own lr-scale.
- ``_connected_nodes``: a node wait with a timeout; Flower's ``sample_nodes`` waits forever.
- ``_sample``: a seeded sampler whose state is checkpointed (``sample_nodes`` draws from the
  global ``random``), so a resumed run samples as an uninterrupted one would.
- client identity (``clients``, a ``strategies.clients.ClientRegistry``): state is keyed by the
  replies' "client-key" (the partition id), because node ids change when a SuperNode restarts.
- ``_collect``: every reply's numbers to the ``recorder``
  (``fellrec_flwr.eval.recorder.RunRecorder``: one row per metric, the columns of metrics.csv),
  and failures traced to clients: FedAvg keeps only the means, and an error reply's
  ``src_node_id`` may be the SuperLink, so the sent messages are kept and matched through
  ``reply_to_message_id``.
- ``aggregate_arrays``: the one step a strategy overrides to aggregate differently. FedAvg's
  weighted mean is streamed a block of tensors at a time (``aggregation-block-mb``; Flower's
  ``aggregate_arrayrecords`` parses every Array into a copy and adds whole copies).
- ``after_evaluate``: feeds ``best`` (``strategies.best.BestAdapters``): each client's best
  adapter, and early stopping on the client-size-weighted validation loss.
- ``start``: calls Flower's ``Strategy.start`` for three things its 1.42 loop lacks:
  absolute rounds (Flower counts every ``start()`` from 1; ``absolute_round`` adds the
  rounds a resumed run already did), a round-end hook for checkpoints and metric files
  (``end_round``, passed as ``evaluate_fn``: the only call Flower's loop makes after each
  round), and early stopping (``should_stop`` comes in 1.43; once stopped, the rounds left
  in Flower's loop send no messages).
- ``evaluate_all``: one evaluation outside the loop (the final test split, best or last adapter).
- ``state_dict()`` / ``load_state_dict()``: checkpoints in plain python/numpy, assembled by
  ``StrategyState`` from the pieces above (each piece saves and loads its own keys).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_metricrecords,
    validate_message_reply_consistency,
)

from fellrec_flwr.eval.recorder import SERVER, RunRecorder

from .arrays import FlatLayout, RecordRows, block_columns, from_numpy_dict, to_numpy_dict
from .best import BestAdapters
from .clients import CLIENT_KEY, ClientRegistry

TRAIN_LOSS = "train-loss"
# Wall-clock metrics: recorded like the others, but they differ from run to run.
TIMING_METRICS = ("round-seconds", "train-seconds", "peak-gpu-mb", "held-gpu-mb")
EVAL_LOSS = "eval-loss"
PER_USER = "per-user"  # optional ConfigRecord of an evaluate reply: user-ids, target-ranks
STATE_VERSION = 1

RoundEndHook = Callable[[int, "StrategyBase"], None]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class StrategyState:
    """A strategy's checkpoint, by piece: its loop's own (round, sampler, global and initial
    arrays), then each piece's state (recorder, client registry, best adapters) and the
    subclass's (``extra_state``: personal adapters, FELLRec's losses). :meth:`as_dict` is the
    format saved (version ``STATE_VERSION``: the pieces' keys side by side, plain python and
    numpy); each piece reads its own keys back (``load``)."""

    strategy: str
    round: int
    rng_state: Any
    global_arrays: dict[str, Any] | None
    initial_arrays: dict[str, Any] | None
    recorder: dict[str, Any]
    clients: dict[str, Any]
    best: dict[str, Any]
    extra: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "strategy": self.strategy, "round": self.round,
                **self.recorder, **self.clients, **self.best, "rng_state": self.rng_state,
                "global": self.global_arrays, "initial": self.initial_arrays, **self.extra}

    @staticmethod
    def check(state: dict[str, Any], strategy: str) -> None:
        """Refuse a checkpoint of another format or strategy, naming the fix."""
        if state.get("version") != STATE_VERSION:
            raise CheckpointMismatchError(
                f"checkpoint format {state.get('version')!r}; this code reads format {STATE_VERSION}."
            )
        if state.get("strategy") != strategy:
            raise CheckpointMismatchError(
                f"checkpoint was written by strategy {state.get('strategy')!r}, not {strategy!r}: "
                "resume with the same strategy setting."
            )


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's mode: the split asked for, whether each client is sent its best adapter
    (``evaluate_all(adapter="best")``) instead of its current one, and whether the losses feed
    the best-adapter tracker and early stopping (the loop's validation only)."""

    split: str
    send_best: bool = False
    tracks_best: bool = False


class NoNodesConnectedError(RuntimeError):
    """No SuperNode connected within node_wait_timeout."""


class DuplicateClientKeyError(ValueError):
    """Two nodes replied with the same client-key in one round."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by another strategy or format version."""


def aggregate_metrics_without_key(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's weighted metric mean, minus the client-key (an identity, not a metric)."""
    metrics = aggregate_metricrecords(records, weighted_by_key)
    if CLIENT_KEY in metrics:
        del metrics[CLIENT_KEY]
    return metrics


def metrics_of(content: RecordDict) -> MetricRecord:
    """The (single) MetricRecord of a reply."""
    return next(iter(content.metric_records.values()))


class StrategyBase(FedAvg):
    """Flower's FedAvg with per-node messages, per-client records, resume and early stop.

    Subclasses override steps, as Flower's own strategies do: :meth:`aggregate_arrays`,
    :meth:`arrays_for_node`, :meth:`add_train_config`, :meth:`personal_arrays` and the
    state hooks (:class:`strategies.personal.PersonalisedBase` keeps one adapter per client).
    """

    def __init__(
        self,
        *args: Any,
        eval_interval: int = 1,
        early_stop_patience: int = 0,
        node_wait_timeout: float = 300.0,
        node_poll_interval: float = 1.0,
        identify_timeout: float = 120.0,
        seed: int = 0,
        aggregation_block_mb: float = 64.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_metrics_without_key)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_metrics_without_key)
        super().__init__(*args, **kwargs)
        if eval_interval < 0 or early_stop_patience < 0 or node_wait_timeout < 0:
            raise ValueError("eval_interval, early_stop_patience and node_wait_timeout must be >= 0.")
        self.eval_interval = eval_interval  # evaluate every n rounds; 0 = only the last round
        block_columns(aggregation_block_mb, 1)  # refuses a bad size now, not in the first aggregation
        self.aggregation_block_mb = aggregation_block_mb  # MiB per block of uploads (strategies.arrays)
        self.best = BestAdapters(patience=early_stop_patience)  # each client's best adapter; early stop
        self.node_wait_timeout = node_wait_timeout
        self.node_poll_interval = node_poll_interval
        self.identify_timeout = identify_timeout
        self.round_offset = 0  # rounds already completed (advanced by end_round, set by load_state_dict)
        self.recorder = RunRecorder()  # every reply's numbers, per-user ranks and failures
        self.clients = ClientRegistry()  # node id -> client key
        self.global_arrays: ArrayRecord | None = None
        self.initial_arrays: ArrayRecord | None = None
        self._rng = random.Random(seed)
        # Set by start() for the length of Flower's loop.
        self._loop_offset = 0  # rounds done before this start(): Flower's round r is r + this
        self._final_round = 0
        self._evaluate_fn: EvaluateFn | None = None
        self._round_end: RoundEndHook | None = None
        self._skip_rest = False  # stopped early: Flower's loop runs on, the rounds left send nothing
        self._round_started = 0.0
        # Per stage: the messages of the current round (to trace error replies) and the arrays each node got.
        self._inflight: dict[str, list[Message]] = {"train": [], "evaluate": []}
        self._sent_arrays: dict[str, dict[int, ArrayRecord]] = {"train": {}, "evaluate": {}}
        # The evaluation in flight: Flower's aggregate_evaluate(round, replies) does not say which
        # one its configure_evaluate started, so that one call leaves it here for the other.
        self._evaluation = Evaluation("valid")
        self._degraded_to: int | None = None  # node count accepted after a wait timed out

    # ------------------------------------------------------------------ identities
    @property
    def node_to_key(self) -> dict[int, int]:
        """node id -> client key, as far as known (:class:`strategies.clients.ClientRegistry`)."""
        return self.clients.node_to_key

    def has_personal_state(self) -> bool:
        """True once clients have arrays of their own: nodes must then be identified before sending."""
        return False

    def _identify_nodes(self, grid: Grid, node_ids: list[int], server_round: int, send_best: bool = False) -> None:
        """Identify unknown nodes first when what they get depends on who they are."""
        sends_best = send_best and bool(self.best.arrays)  # best adapters are per client, too
        if sends_best or self.has_personal_state():
            self.clients.identify(grid, node_ids, server_round, self.configrecord_key, self.identify_timeout)

    # ------------------------------------------------------------------ sampling
    def _connected_nodes(self, grid: Grid) -> list[int]:
        """Wait up to node_wait_timeout for min_available_nodes; then go on with who is there.

        After a timeout the run is "degraded": later rounds go ahead at once with at least
        as many nodes as then, and wait again only if even fewer are connected (so a node
        that died for good costs one timeout, not one per round). Reaching
        min_available_nodes again ends the degraded state.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        next_log = 0.0
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.min_available_nodes:
                self._degraded_to = None
                return nodes
            if self._degraded_to is not None and len(nodes) >= self._degraded_to:
                return nodes
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_log:
                log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
                    len(nodes), self.min_available_nodes)
                next_log = now + 30.0
            time.sleep(min(self.node_poll_interval, max(deadline - now, 0.0)))
        if not nodes:
            raise NoNodesConnectedError(
                f"No node connected within node-wait-timeout={self.node_wait_timeout:g} s. Start the SuperNodes "
                "(or check the federation's num-supernodes) or raise node-wait-timeout."
            )
        log(WARNING, "Only %d of %d required nodes connected after %.0f s; continuing with them.",
            len(nodes), self.min_available_nodes, self.node_wait_timeout)
        self._degraded_to = len(nodes)
        return nodes

    def _sample(self, grid: Grid, fraction: float, min_nodes: int, stage: str) -> list[int]:
        nodes = self._connected_nodes(grid)
        size = min(max(int(len(nodes) * fraction), min_nodes, 1), len(nodes))
        sampled = sorted(self._rng.sample(nodes, size))
        log(INFO, "configure_%s: Sampled %s nodes (out of %s)", stage, len(sampled), len(nodes))
        return sampled

    # ------------------------------------------------------------------ per-node content (hooks)
    def arrays_for_node(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """The arrays a node trains/evaluates on; the global ones unless personalised."""
        return arrays

    def personal_arrays(self, client_key: int) -> ArrayRecord | None:
        """A client's current adapter (for FedAvg/FedProx: the global arrays)."""
        return self.global_arrays

    def best_personal_arrays(self, client_key: int) -> ArrayRecord | None:
        """The client's adapter from the round with its lowest own valid loss (else its current one)."""
        return self.best.arrays.get(client_key, self.personal_arrays(client_key))

    def best_arrays_for_node(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """The node's client's best adapter by its own valid loss; its usual arrays if it has none."""
        key = self.node_to_key.get(node_id)
        if key is not None and key in self.best.arrays:
            return self.best.arrays[key]
        return self.arrays_for_node(node_id, arrays)

    def add_train_config(self, config: ConfigRecord, node_id: int) -> None:
        """Per-node train settings, written into that node's own ConfigRecord copy."""
        config["lr-scale"] = 1.0

    def _build_messages(self, stage: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        node_ids: list[int], evaluation: Evaluation | None = None) -> list[Message]:
        message_type = MessageType.TRAIN if stage == "train" else MessageType.EVALUATE
        messages, sent = [], {}
        for node_id in node_ids:
            node_config = ConfigRecord(dict(config))  # never mutate the caller's record
            node_config["server-round"] = server_round
            if evaluation is None:
                self.add_train_config(node_config, node_id)
            else:
                node_config["split"] = evaluation.split
            node_arrays = (self.best_arrays_for_node(node_id, arrays) if evaluation is not None and evaluation.send_best
                           else self.arrays_for_node(node_id, arrays))
            sent[node_id] = node_arrays
            content = RecordDict({self.arrayrecord_key: node_arrays, self.configrecord_key: node_config})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        # The grid fills message_id in place when it pushes; kept to trace error replies.
        self._inflight[stage] = messages
        self._sent_arrays[stage] = sent
        return messages

    # ------------------------------------------------------------------ Flower's steps, per node
    def absolute_round(self, server_round: int) -> int:
        """The run's round for Flower's loop round ``server_round`` (outside start(): itself)."""
        return server_round + self._loop_offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round = self.absolute_round(server_round)
        self._round_started = time.time()  # the round's wall time runs from here to end_round
        node_ids: list[int] = []
        if self.fraction_train > 0.0 and not self._skip_rest:
            node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes, "train")
            self._identify_nodes(grid, node_ids, server_round)
        return self._build_messages("train", server_round, arrays, config, node_ids)

    def evaluation_due(self, server_round: int) -> bool:
        """In the loop: every eval_interval rounds, and in the last round."""
        if server_round == self._final_round:
            return True
        return self.eval_interval > 0 and server_round % self.eval_interval == 0

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The loop's evaluation (when due): the config's split; a "valid" one feeds ``best``."""
        server_round = self.absolute_round(server_round)
        split = str(config.get("split", "valid"))
        self._evaluation = Evaluation(split, tracks_best=split == "valid")
        due = self.fraction_evaluate > 0.0 and not self._skip_rest and self.evaluation_due(server_round)
        return self._configure_evaluation(server_round, arrays, config, grid, self._evaluation, sample=due)

    def _configure_evaluation(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                              evaluation: Evaluation, sample: bool = True) -> list[Message]:
        node_ids: list[int] = []
        if sample:
            node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate")
            self._identify_nodes(grid, node_ids, server_round, send_best=evaluation.send_best)
        return self._build_messages("evaluate", server_round, arrays, config, node_ids, evaluation)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.absolute_round(server_round)
        collected = self._collect(server_round, replies, "train", "train")
        if not collected:
            return None, None
        # Kept here, not taken from Flower's loop: this round's evaluation may already need it.
        self.global_arrays = self.aggregate_arrays(server_round, collected)
        contents = [reply.content for _, _, reply in collected]
        return self.global_arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def aggregate_arrays(self, server_round: int, collected: list[tuple[int, int, Message]]) -> ArrayRecord:
        """The new "global" arrays from this round's (client_key, node_id, reply): FedAvg's weighted mean.

        Flower's ``aggregate_arrayrecords`` computes the same mean, but it parses every Array
        through ``.numpy()`` and adds whole float32 copies one client at a time; this streams the
        uploads a block of tensors at a time through one BLAS product (strategies.arrays).
        """
        uploads = [reply.content[self.arrayrecord_key] for _, _, reply in collected]
        layout = FlatLayout.of(uploads[0])
        for (key, _, _), record in zip(collected, uploads):
            layout.check(record, f"client-key {key}")
        sizes = np.array([float(metrics_of(reply.content)[self.weighted_by_key])  # type: ignore[arg-type]
                          for _, _, reply in collected])
        mean = RecordRows(layout, 1)
        for t0, t1, block in layout.mixed_blocks((sizes / sizes.sum())[None, :], uploads,
                                                 block_columns(self.aggregation_block_mb, len(uploads))):
            mean.add(t0, t1, block)
        return mean.records()[0]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self._aggregate_evaluation(self.absolute_round(server_round), replies, self._evaluation)

    def _aggregate_evaluation(self, server_round: int, replies: Iterable[Message],
                              evaluation: Evaluation) -> MetricRecord | None:
        collected = self._collect(server_round, replies, "evaluate", evaluation.split)
        if not collected:
            return None
        if evaluation.tracks_best:
            self.after_evaluate(server_round, collected)
        contents = [reply.content for _, _, reply in collected]
        return self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key)

    def after_evaluate(self, server_round: int, collected: list[tuple[int, int, Message]]) -> None:
        """Track each client's best adapter and early-stop on the size-weighted validation loss.

        Each client keeps the arrays with its own lowest valid loss (the authors' protocol);
        early stopping looks at the loss weighted by each client's number of examples.
        """
        evaluations = []
        for key, node_id, reply in collected:
            metrics = metrics_of(reply.content)
            if EVAL_LOSS not in metrics:
                return  # a strategy test app without losses: nothing to track
            evaluations.append((key, float(metrics[EVAL_LOSS]), float(metrics[self.weighted_by_key]),  # type: ignore[arg-type]
                                self._sent_arrays["evaluate"][node_id]))
        loss = self.best.observe(server_round, evaluations)
        if loss is not None:
            log(INFO, "\t└──> weighted valid loss %.5f (best %.5f at round %d)",
                loss, self.best.best_loss, self.best.best_round)

    # ------------------------------------------------------------------ replies: rows and failures
    def _collect(self, server_round: int, replies: Iterable[Message], stage: str,
                 split: str = "train") -> list[tuple[int, int, Message]]:
        """Valid replies as (client_key, node_id, reply) sorted by key; records rows and failures."""
        replies = list(replies)
        if not replies and not self._inflight[stage]:
            return []  # nothing was sent (no evaluation due, or stopped early): nothing to log
        valid = [r for r in replies if not r.has_error()]
        errors = [r for r in replies if r.has_error()]
        log(INFO, "aggregate_%s: Received %s results and %s failures", stage, len(valid), len(errors))
        if valid:
            validate_message_reply_consistency(
                replies=[r.content for r in valid],
                weighted_by_key=self.weighted_by_key,
                check_arrayrecord=stage == "train",
            )
        out = []
        for reply in valid:
            node_id = reply.metadata.src_node_id
            key = self.clients.key_of(metrics_of(reply.content), node_id)
            self.clients.remember(node_id, key)
            out.append((key, node_id, reply))
            self.recorder.add_metrics(server_round, key, split, metrics_of(reply.content), skip=(CLIENT_KEY,))
            per_user = reply.content.config_records.get(PER_USER)
            if stage != "train" and per_user is not None:
                self.recorder.add_user_ranks(server_round, key, split, per_user["user-ids"],  # type: ignore[arg-type]
                                             per_user["target-ranks"],  # type: ignore[arg-type]
                                             per_user.get("targets"), per_user.get("top10"))  # per_user.csv's items
        out.sort(key=lambda item: item[0])
        for (key_a, node_a, _), (key_b, node_b, _) in zip(out, out[1:]):
            if key_a == key_b:
                raise DuplicateClientKeyError(
                    f"nodes {node_a} and {node_b} both replied as client-key {key_a}: give every SuperNode its "
                    "own partition-id (--node-config \"partition-id=<i> num-partitions=<N>\")."
                )
        self._record_failures(server_round, stage, valid, errors)
        return out

    def _record_failures(self, server_round: int, stage: str, valid: list[Message], errors: list[Message]) -> None:
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._inflight[stage]}
        answered = set()
        for reply in valid:
            answered.add(sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id))
        failed: list[tuple[int, str]] = []
        for reply in errors:
            # An error made by the SuperLink has src_node_id 1: trust the message we sent.
            node_id = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node_id)
            failed.append((node_id, str(reply.error.reason)))
        for message in self._inflight[stage]:
            if message.metadata.dst_node_id not in answered:
                failed.append((message.metadata.dst_node_id, "no reply before the timeout"))
        for node_id, reason in failed:
            key = self.node_to_key.get(node_id)
            self.recorder.add_failure(server_round, stage, node_id, key, reason)
            log(WARNING, "\t> %s failed in round %d for node %d (client-key %s): %s",
                stage, server_round, node_id, key, reason)

    # The recorder's rows, read where a run writes its files (and by tests).
    @property
    def records(self) -> list[dict[str, Any]]:
        return self.recorder.records

    @property
    def user_ranks(self) -> list[dict[str, Any]]:
        return self.recorder.user_ranks

    @property
    def failures(self) -> list[dict[str, Any]]:
        return self.recorder.failures

    def failed_clients(self, server_round: int | None = None, stage: str = "train") -> Any:
        return self.recorder.failed_clients(server_round, stage)

    def metric_rows(self) -> list[dict[str, Any]]:
        """All per-client rows so far (round, client, split, metric, value); restored on resume."""
        return self.recorder.metric_rows()

    def client_keys(self) -> list[int]:
        """Every client key seen in a reply (or restored from a checkpoint)."""
        return sorted(self.recorder.clients() | set(self.node_to_key.values()))

    # ------------------------------------------------------------------ the loop: Flower's
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        on_round_end: RoundEndHook | None = None,
    ) -> Result:
        """Flower's ``Strategy.start`` for rounds round_offset+1 .. round_offset+num_rounds.

        Rounds are absolute everywhere (messages, records, checkpoints, Result keys); only
        Flower's "[ROUND r/N]" log line counts from 1. ``on_round_end(round, strategy)``
        runs after every round (the only way to set it); no round starts
        after ``stopped_early`` is set. ``initial_arrays``: a fresh run's starting point,
        or the checkpoint's global arrays on resume.
        """
        offset = self.round_offset
        if offset:
            log(INFO, "Resuming after round %d: Flower's round r below is round %d + r.", offset, offset)
        if self.initial_arrays is None:
            self.initial_arrays = initial_arrays
        if self.global_arrays is None:
            self.global_arrays = initial_arrays
        self._loop_offset, self._final_round = offset, offset + num_rounds
        self._evaluate_fn = evaluate_fn
        self._round_end = on_round_end
        try:
            result = super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                   train_config=train_config, evaluate_config=evaluate_config,
                                   evaluate_fn=self.end_round)
        finally:
            self._loop_offset, self._skip_rest, self._evaluate_fn, self._round_end = 0, False, None, None
        return Result(
            # Flower's Result starts with an empty ArrayRecord: no aggregate means the arrays we started from.
            arrays=result.arrays if len(result.arrays) else initial_arrays,
            train_metrics_clientapp={r + offset: m for r, m in result.train_metrics_clientapp.items()},
            evaluate_metrics_clientapp={r + offset: m for r, m in result.evaluate_metrics_clientapp.items()},
            evaluate_metrics_serverapp={r + offset: m for r, m in result.evaluate_metrics_serverapp.items()},
        )

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's loop calls this as its evaluate_fn: the caller's evaluate_fn, then the round's end.

        Round 0 is Flower's evaluation of the initial arrays (skipped on resume: it was done).
        The round's end: its wall time (train + evaluation, for rounds per hour in
        benchmarks), the round counter, the on_round_end hook and the early-stop check.
        The price: Flower logs "Global evaluation ... None" after rounds without an evaluate_fn.
        """
        if server_round == 0:
            return self._evaluate_fn(0, arrays) if self._evaluate_fn and self._loop_offset == 0 else None
        if self._skip_rest:
            return None
        server_round = self.absolute_round(server_round)
        metrics = self._evaluate_fn(server_round, arrays) if self._evaluate_fn else None
        self.recorder.add(server_round, SERVER, "server", "round-seconds", time.time() - self._round_started)
        self.round_offset = server_round
        if self._round_end is not None:
            self._round_end(server_round, self)
        if self.best.stopped_early:
            log(INFO, "Early stop after round %d: no better weighted valid loss for %d evaluations (best %.5f at "
                "round %d); the rounds left send nothing.", server_round, self.best.evals_since_best,
                self.best.best_loss, self.best.best_round)
            self._skip_rest = True
        return metrics

    def evaluate_all(self, grid: Grid, arrays: ArrayRecord | None = None, split: str = "test",
                     server_round: int | None = None, config: ConfigRecord | None = None,
                     timeout: float = 3600, adapter: str = "last") -> MetricRecord | None:
        """Evaluate every connected client once, outside the loop (e.g. the final test split).

        ``adapter="last"``: personalised strategies send each client its own arrays, the others
        ``arrays`` (default: the current global arrays). ``adapter="best"``: each client gets the
        arrays of the round with its own lowest valid loss (the authors test ``best_client{i}``),
        a client never evaluated on valid gets the "last" ones. Rows are recorded under ``split``
        at ``server_round`` (default: the last finished round); early stopping is not touched.
        """
        if adapter not in ("best", "last"):
            raise ValueError(f"adapter={adapter!r} must be 'best' or 'last' (eval.test-adapter).")
        server_round = self.round_offset if server_round is None else server_round
        if arrays is None:
            arrays = self.global_arrays if self.global_arrays is not None else ArrayRecord()
        config = ConfigRecord(dict(config or {}))
        evaluation = Evaluation(split, send_best=adapter == "best")  # outside the loop: never feeds `best`
        messages = (self._configure_evaluation(server_round, arrays, config, grid, evaluation)
                    if self.fraction_evaluate > 0.0 else [])
        replies = grid.send_and_receive(messages=messages, timeout=timeout) if messages else []
        return self._aggregate_evaluation(server_round, replies, evaluation)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run; plain python and numpy (picklable)."""
        return StrategyState(
            strategy=self.__class__.__name__, round=self.round_offset, rng_state=self._rng.getstate(),
            global_arrays=to_numpy_dict(self.global_arrays), initial_arrays=to_numpy_dict(self.initial_arrays),
            recorder=self.recorder.state(), clients=self.clients.state(), best=self.best.state(),
            extra=self.extra_state(),
        ).as_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next :meth:`start` continues after ``state["round"]``."""
        StrategyState.check(state, self.__class__.__name__)
        self.round_offset = int(state["round"])
        self.recorder.load(state)
        self.clients.load(state)
        self.best.load(state)
        self._rng.setstate(state["rng_state"])
        self.global_arrays = from_numpy_dict(state["global"])
        self.initial_arrays = from_numpy_dict(state["initial"])
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass
