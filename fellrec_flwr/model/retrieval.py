"""RecFormer-style retrieval head: rank the whole catalogue with one forward per user.

The paper's second backbone. The same LLaMA-family model with its LoRA encodes two kinds
of text into vectors:

- a user: the history titles (``prompts.history_input``, oldest titles dropped to fit
  ``max_length`` tokens);
- an item: its title in quotes (``prompts.format_response``), one per title group.

A vector is the final hidden state (after the last norm, LoRA on) pooled over the text's
tokens -- ``mean`` over every token or the ``last`` token -- and L2-normalised. A user's
score for an item is ``cos(user, item) / temperature`` (RecFormer: 0.05); training
minimises the cross-entropy of the target among the batch's targets (in-batch negatives)
plus ``negatives`` title groups drawn uniformly from the catalogue. Evaluation encodes
every title group once with the current adapter (item vectors are recomputed per
evaluation, so they follow the adapter), then one matrix product per user batch.

Duplicate titles and history masking follow `fellrec_flwr.eval.grounding`: title groups are
ranked, a top-K holds K distinct titles, the user's history groups are skipped. On unit
vectors ``||u - v||^2 = 2 - 2 u.v``, so the L2 ranking of `grounding.rank` over a
catalogue of item vectors is exactly the cosine ranking; it is reused as is.

FELLRec and every other strategy see only the LoRA arrays, so they apply unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from fellrec_flwr.progress import tqdm

from fellrec_flwr.data.collate import lookup_titles, pad_token_id_of, prompt_token_ids
from fellrec_flwr.config import RETRIEVAL_POOLINGS, RetrievalSettings, TrainSettings
from fellrec_flwr.eval.grounding import Catalogue, TitleGroups, _decoder
from fellrec_flwr.eval.metrics import DEFAULT_KS, ranking_metrics, target_ranks, target_ranks_from_scores
from fellrec_flwr.data.prompts import GAMES, PromptDomain, format_response, history_input
from fellrec_flwr.seeding import derive_seed, seeded_torch, torch_generator
from fellrec_flwr.model.speed import autocast
from fellrec_flwr.train.trainer import (TrainingError, TrainResult, _check_factors, loss_scaler, model_device,
                                         proximal_term)


class RetrievalError(ValueError):
    """The retrieval head cannot run as asked (bad pooling, temperature, shapes, empty input)."""


# --------------------------------------------------------------------------- texts


def item_text(title: str) -> str:
    return format_response(title)


def user_token_ids(tokenizer: Any, history_titles: Sequence[str], max_length: int,
                   domain: PromptDomain = GAMES) -> list[int]:
    """BOS + the history text, dropping the oldest titles until it fits `max_length` tokens."""
    history = list(history_titles)
    ids = prompt_token_ids(tokenizer, history_input(history, domain))
    while len(ids) > max_length and len(history) > 1:
        history = history[1:]
        ids = prompt_token_ids(tokenizer, history_input(history, domain))
    return ids[:max_length]


def item_token_ids(tokenizer: Any, titles: Sequence[str], max_length: int) -> list[list[int]]:
    return [prompt_token_ids(tokenizer, item_text(t))[:max_length] for t in titles]


# --------------------------------------------------------------------------- pure pieces


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, d) right-padded hidden states -> (B, d) unit vectors.

    ``mean``: average over each row's first ``lengths[i]`` positions; ``last``: position
    ``lengths[i] - 1``.
    """
    if pooling not in RETRIEVAL_POOLINGS:
        raise RetrievalError(f"pooling={pooling!r} is not one of {', '.join(RETRIEVAL_POOLINGS)}.")
    if pooling == "last":
        pooled = hidden[torch.arange(len(hidden), device=hidden.device), lengths.to(hidden.device) - 1]
    else:
        mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None])
        pooled = (hidden * mask[..., None].to(hidden.dtype)).sum(1) / lengths.to(hidden.device)[:, None].to(hidden.dtype)
    return F.normalize(pooled.float(), dim=-1)


def score_matrix(user_vecs: torch.Tensor | np.ndarray, item_vecs: torch.Tensor | np.ndarray,
                 temperature: float) -> Any:
    """(U, I) logits: dot products of unit vectors (cosines) divided by the temperature."""
    check_temperature(temperature)
    return (user_vecs @ item_vecs.T) / temperature


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise RetrievalError(f"retrieval.temperature={temperature} must be a finite number > 0 (RecFormer: 0.05).")


def batch_columns(target_groups: Sequence[int], extra_groups: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """The title groups a batch scores against, and each user's label among them.

    Columns are the batch's distinct target groups (first appearance order) followed by
    the extra (sampled) groups not already there, so two users with the same target share
    one column instead of being each other's false negative.
    """
    columns: list[int] = []
    index: dict[int, int] = {}
    for g in list(target_groups) + list(extra_groups):
        if int(g) not in index:
            index[int(g)] = len(columns)
            columns.append(int(g))
    return columns, [index[int(g)] for g in target_groups]


def history_column_mask(columns: Sequence[int], history_groups: Sequence[Sequence[int]],
                        labels: Sequence[int]) -> torch.Tensor:
    """(B, C) bool: True where a column is one of the user's history groups but not its target.

    Evaluation never recommends a history title, so training need not push them down.
    """
    mask = torch.zeros((len(history_groups), len(columns)), dtype=torch.bool)
    position = {g: c for c, g in enumerate(columns)}
    for row, groups in enumerate(history_groups):
        for g in groups:
            c = position.get(int(g))
            if c is not None and c != labels[row]:
                mask[row, c] = True
    return mask


def retrieval_loss(user_vecs: torch.Tensor, item_vecs: torch.Tensor, labels: torch.Tensor, temperature: float,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each user's label column under softmax(cos / temperature)."""
    logits = score_matrix(user_vecs, item_vecs, temperature)
    if mask is not None:
        logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
    return F.cross_entropy(logits, labels.to(logits.device))


# --------------------------------------------------------------------------- encoding


def encode_token_ids(model: Any, token_ids: Sequence[Sequence[int]], pad_id: int, pooling: str) -> torch.Tensor:
    """(n, d) unit vectors of one batch, through the model's decoder with its LoRA active.

    Right padding and gathering by length make a row independent of its batch-mates
    (positions start at 0, causal attention never looks at the padding after a text).
    """
    input_ids, attention, lengths_list = _right_padded(token_ids, pad_id)
    lengths = torch.tensor(lengths_list, dtype=torch.long)
    device = model_device(model)
    hidden = _decoder(model)(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             use_cache=False).last_hidden_state
    return pool(hidden, lengths, pooling)


def _encode_in_length_order(model: Any, items: Sequence[Any], encode_batch: Callable[[list[Any]], torch.Tensor],
                            batch_size: int, progress: bool, desc: str, what: str) -> np.ndarray:
    """(n, d) float32 rows of `encode_batch` over `items`, batched shortest first, in input order (eval mode)."""
    order = np.argsort([len(x) for x in items], kind="stable")
    out: np.ndarray | None = None
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = order[start:start + batch_size]
            vecs = encode_batch([items[i] for i in batch]).cpu().numpy()
            if out is None:
                out = np.empty((len(items), vecs.shape[1]), dtype=np.float32)
            out[batch] = vecs
    finally:
        model.train(was_training)
    if out is None:
        raise RetrievalError(f"nothing to encode: the list of {what} is empty.")
    return out


@torch.no_grad()
def encode_all(model: Any, tokenizer: Any, token_ids: Sequence[Sequence[int]], pooling: str, batch_size: int,
               progress: bool = False, desc: str = "encoding") -> np.ndarray:
    """(n, d) float32 unit vectors in input order; shortest texts batched together, eval mode."""
    if batch_size < 1:
        raise RetrievalError(f"batch_size={batch_size} must be >= 1.")
    pad_id = pad_token_id_of(tokenizer)
    return _encode_in_length_order(model, token_ids, lambda ids: encode_token_ids(model, ids, pad_id, pooling),
                                   batch_size, progress, desc, "texts")


# --------------------------------------------------------------------------- the frozen prefix
# With LoRA in the last layers only (lora.layers), the hidden states entering the first
# adapted layer never change while the adapter trains: compute them once per text and run
# only the top layers for every later evaluation (zero-shot, then after training).


def frozen_prefix_layers(model: Any) -> int:
    """How many leading decoder layers hold nothing trainable (0 when that cannot be told)."""
    from fellrec_flwr.model.speed import decoder_parts, first_changing_layer

    parts = decoder_parts(model)
    if parts is None:
        return 0
    return min(first_changing_layer(parts), len(parts.decoder.layers))


@torch.no_grad()
def prefix_states(model: Any, tokenizer: Any, token_ids: Sequence[Sequence[int]], stop: int, batch_size: int = 64,
                  progress: bool = False, desc: str = "frozen prefix") -> list[torch.Tensor]:
    """Per text, the [len, d] hidden states entering decoder layer `stop` (no final norm)."""
    from fellrec_flwr.model.speed import layer_range

    decoder = _decoder(model)
    pad_id = pad_token_id_of(tokenizer)
    order = np.argsort([len(t) for t in token_ids], kind="stable")
    out: list[torch.Tensor | None] = [None] * len(token_ids)
    was_training = model.training
    model.eval()
    try:
        with layer_range(decoder, 0, stop, final_norm=False):
            for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
                batch = order[start:start + batch_size]
                ids, attention, lengths = _right_padded([token_ids[i] for i in batch], pad_id)
                hidden = decoder(input_ids=ids.to(model_device(model)), attention_mask=attention.to(model_device(model)),
                                 use_cache=False).last_hidden_state.float().cpu()
                for row, index in enumerate(batch):
                    out[index] = hidden[row, : lengths[row]].clone()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def encode_states(model: Any, states: Sequence[torch.Tensor], start: int, pooling: str) -> torch.Tensor:
    """(n, d) unit vectors from `prefix_states(..., stop=start)`: only layers[start:] and the norm run."""
    from fellrec_flwr.model.speed import hidden_dtype, layer_range, pad_hidden

    decoder = _decoder(model)
    lengths = torch.tensor([len(s) for s in states], dtype=torch.long)
    attention = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    device = model_device(model)
    inputs = pad_hidden(states).to(device, dtype=hidden_dtype(decoder))  # bf16/fp16 layers take bf16/fp16
    with layer_range(decoder, start, len(decoder.layers)):
        hidden = decoder(inputs_embeds=inputs, attention_mask=attention.to(device), use_cache=False).last_hidden_state
    return pool(hidden, lengths, pooling)


@torch.no_grad()
def encode_all_states(model: Any, states: Sequence[torch.Tensor], start: int, pooling: str, batch_size: int = 64,
                      progress: bool = False, desc: str = "top layers") -> np.ndarray:
    """(n, d) float32 unit vectors of cached prefix states, in input order (eval mode)."""
    return _encode_in_length_order(model, states, lambda batch: encode_states(model, batch, start, pooling),
                                   batch_size, progress, desc, "states")


def _right_padded(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    lengths = [len(t) for t in token_ids]
    if min(lengths) < 1:
        raise RetrievalError("a text encoded to no tokens; every text needs at least one token.")
    input_ids = torch.full((len(token_ids), max(lengths)), int(pad_id), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, seq in enumerate(token_ids):
        input_ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention[row, : len(seq)] = 1
    return input_ids, attention, lengths


def item_vectors(model: Any, tokenizer: Any, groups: TitleGroups, settings: RetrievalSettings, max_length: int,
                 batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """(G, d) unit vectors of every title group with the current adapter (row g = groups.titles[g])."""
    return encode_all(model, tokenizer, item_token_ids(tokenizer, groups.titles, max_length), settings.pooling,
                      batch_size, progress, desc="item vectors")


def user_vectors(model: Any, tokenizer: Any, histories: Sequence[Sequence[str]], settings: RetrievalSettings,
                 max_length: int, batch_size: int = 64, progress: bool = False,
                 domain: PromptDomain = GAMES) -> np.ndarray:
    """(U, d) unit vectors of users given their history titles (oldest first)."""
    ids = [user_token_ids(tokenizer, h, max_length, domain) for h in histories]
    return encode_all(model, tokenizer, ids, settings.pooling, batch_size, progress, desc="user vectors")


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class _Prepared:
    user_ids: list[list[int]]  # token ids per example
    targets: list[int]  # title group per example
    history_groups: list[list[int]]


def _prepare(tokenizer: Any, examples: Sequence[Any], titles: Mapping[int, str], groups: TitleGroups,
             max_length: int, domain: PromptDomain) -> _Prepared:
    return _Prepared(
        user_ids=[user_token_ids(tokenizer, lookup_titles(ex.history, titles), max_length, domain) for ex in examples],
        targets=groups.group_index([int(ex.target) for ex in examples]).tolist(),
        history_groups=[groups.group_index(ex.history).tolist() if len(ex.history) else [] for ex in examples],
    )


def train_retrieval(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    titles: Mapping[int, str],
    train_cfg: TrainSettings,
    settings: RetrievalSettings,
    seed: int,
    proximal_mu: float = 0.0,
    lr_scale: float = 1.0,
    progress: bool = True,
    groups: TitleGroups | None = None,
    domain: PromptDomain = GAMES,
    max_seconds: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    autocast_to: torch.dtype | None = None,
) -> TrainResult:
    """Train the model's trainable parameters (its LoRA) with the retrieval loss, in place.

    One optimiser step per ``train_cfg.batch_size`` examples (its in-batch negatives plus
    ``settings.negatives`` sampled groups); ``train_cfg.grad_accum`` micro-batches are
    accumulated per step, each with its own negatives. AdamW, ``lr * lr_scale`` and the
    FedProx term are the generative trainer's (`fellrec_flwr.train.trainer`). `max_seconds`
    stops after the step that crosses that wall-clock budget (benchmarks);
    ``on_step(step, loss)`` is called after every step (learning curves). `autocast_to`
    (e.g. torch.bfloat16) runs each forward under autocast; never wrap the whole call in
    one autocast block instead: autocast caches its casts of trainable weights until the
    block ends, so later steps would compute with the first step's weights.
    """
    _check_factors(proximal_mu, lr_scale)
    check_temperature(settings.temperature)
    if not examples:
        raise TrainingError("train_retrieval got no examples; a client needs at least one training example.")
    groups = groups or TitleGroups.from_titles(titles)
    data = _prepare(tokenizer, examples, titles, groups, train_cfg.max_length, domain)
    item_ids = item_token_ids(tokenizer, groups.titles, train_cfg.max_length)
    pad_id = pad_token_id_of(tokenizer)

    def batch_loss(batch: Sequence[int], extra: Sequence[int]) -> torch.Tensor:
        return _batch_loss(
            data, batch, extra, settings,
            encode_users=lambda rows: encode_token_ids(model, [data.user_ids[i] for i in rows], pad_id,
                                                       settings.pooling),
            encode_items=lambda cols: encode_token_ids(model, [item_ids[g] for g in cols], pad_id, settings.pooling))

    return _train_loop(model, len(examples), len(groups), batch_loss, train_cfg, settings, seed, proximal_mu,
                       lr_scale, progress, max_seconds, on_step, autocast_to)


def train_retrieval_states(
    model: Any,
    start: int,
    user_states: Sequence[torch.Tensor],
    target_groups: Sequence[int],
    history_groups: Sequence[Sequence[int]],
    item_states: Sequence[torch.Tensor],
    train_cfg: TrainSettings,
    settings: RetrievalSettings,
    seed: int,
    proximal_mu: float = 0.0,
    lr_scale: float = 1.0,
    progress: bool = False,
    max_seconds: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    autocast_to: torch.dtype | None = None,
) -> TrainResult:
    """`train_retrieval` on cached frozen-prefix states: only layers[start:] run, forward and backward.

    user_states[i]: the [len, d] states entering layer `start` of example i's history text
    (`prefix_states`, the same token ids `user_token_ids` gives); target_groups[i] and
    history_groups[i]: its target title group and history groups; item_states[g]: the
    states of title group g's text. Valid only while nothing below layer `start` trains
    (``frozen_prefix_layers(model) >= start``). Batches, negatives, optimiser and FedProx
    are those of `train_retrieval` with the same seed, so both give the same loss on the
    same batch (up to float rounding) and the same training, at a fraction of the cost.
    """
    _check_factors(proximal_mu, lr_scale)
    check_temperature(settings.temperature)
    if not user_states:
        raise TrainingError("train_retrieval_states got no examples; a client needs at least one training example.")
    if not (len(user_states) == len(target_groups) == len(history_groups)):
        raise RetrievalError(f"{len(user_states)} user states, {len(target_groups)} targets and "
                             f"{len(history_groups)} histories: one of each per example.")
    if frozen_prefix_layers(model) < start:
        raise RetrievalError(f"layers below {start} hold trainable weights (first: {frozen_prefix_layers(model)}); "
                             "cached prefix states would be stale.")
    data = _Prepared(user_ids=[], targets=[int(g) for g in target_groups],
                     history_groups=[[int(g) for g in h] for h in history_groups])

    def batch_loss(batch: Sequence[int], extra: Sequence[int]) -> torch.Tensor:
        return _batch_loss(
            data, batch, extra, settings,
            encode_users=lambda rows: encode_states(model, [user_states[i] for i in rows], start, settings.pooling),
            encode_items=lambda cols: encode_states(model, [item_states[g] for g in cols], start, settings.pooling))

    return _train_loop(model, len(user_states), len(item_states), batch_loss, train_cfg, settings, seed,
                       proximal_mu, lr_scale, progress, max_seconds, on_step, autocast_to)


def _train_loop(model: Any, n_examples: int, n_groups: int,
                batch_loss: Callable[[Sequence[int], Sequence[int]], torch.Tensor], train_cfg: TrainSettings,
                settings: RetrievalSettings, seed: int, proximal_mu: float, lr_scale: float, progress: bool,
                max_seconds: float | None, on_step: Callable[[int, float], None] | None,
                autocast_to: torch.dtype | None) -> TrainResult:
    """The optimiser loop shared by both trainers: `batch_loss(example indices, sampled groups)`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters; wrap it with model.add_lora first.")
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr * lr_scale, weight_decay=train_cfg.weight_decay)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    shuffle = torch_generator(derive_seed(seed, "shuffle"))
    sampler = torch_generator(derive_seed(seed, "negatives"))
    scaler = loss_scaler(model, model_device(model))  # float16 compute: loss scaling
    size = train_cfg.batch_size
    steps_per_epoch = math.ceil(math.ceil(n_examples / size) / train_cfg.grad_accum)

    was_training = model.training
    model.train()
    step_losses: list[float] = []
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    bar = tqdm(total=steps_per_epoch * train_cfg.local_epochs, desc="retrieval training", disable=not progress,
               leave=False)
    try:
        with seeded_torch(derive_seed(seed, "dropout")):
            for _ in range(train_cfg.local_epochs):
                order = torch.randperm(n_examples, generator=shuffle).tolist()
                batches = [order[i:i + size] for i in range(0, len(order), size)]
                for start in range(0, len(batches), train_cfg.grad_accum):
                    group = batches[start:start + train_cfg.grad_accum]
                    optimizer.zero_grad(set_to_none=True)
                    loss = 0.0
                    for batch in group:
                        extra = torch.randint(n_groups, (settings.negatives,), generator=sampler).tolist()
                        with autocast(model_device(model), autocast_to):
                            one = batch_loss(batch, extra)
                        scaler.scale(one / len(group)).backward()
                        loss += one.item() / len(group)
                    if proximal_mu > 0:
                        scaler.scale(proximal_term(params, anchors, proximal_mu)).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    step_losses.append(loss)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    bar.update(1)
                    if on_step is not None:
                        on_step(len(step_losses), loss)
                    if deadline is not None and time.monotonic() > deadline:
                        break
                if deadline is not None and time.monotonic() > deadline:
                    break
    finally:
        bar.close()
        model.train(was_training)
    return TrainResult(loss=sum(step_losses) / len(step_losses), steps=len(step_losses), num_examples=n_examples)


def _batch_loss(data: _Prepared, batch: Sequence[int], extra: Sequence[int], settings: RetrievalSettings,
                encode_users: Callable[[Sequence[int]], torch.Tensor],
                encode_items: Callable[[Sequence[int]], torch.Tensor]) -> torch.Tensor:
    """One batch's retrieval loss; the two trainers differ only in how rows and title groups are encoded."""
    columns, labels = batch_columns([data.targets[i] for i in batch], extra)
    mask = history_column_mask(columns, [data.history_groups[i] for i in batch], labels)
    users, items = encode_users(batch), encode_items(columns)
    return retrieval_loss(users, items, torch.tensor(labels), settings.temperature, mask)


# --------------------------------------------------------------------------- evaluation


def full_catalogue_loss(user_vecs: np.ndarray, item_vecs: np.ndarray, target_groups: np.ndarray,
                        history_masks: np.ndarray, temperature: float) -> np.ndarray:
    """Per-user cross-entropy of the target over every title group, history groups (but
    never the target) left out: the validation loss of the retrieval head."""
    logits = np.asarray(score_matrix(user_vecs.astype(np.float64), item_vecs.astype(np.float64), temperature))
    rows = np.arange(len(logits))
    masks = np.array(history_masks, dtype=bool, copy=True)
    masks[rows, target_groups] = False
    logits[masks] = -np.inf
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_norm - logits[rows, target_groups]


def evaluate_retrieval(model: Any, tokenizer: Any, examples: Sequence[Any], titles: Mapping[int, str],
                       settings: RetrievalSettings, max_length: int, batch_size: int = 64, *,
                       groups: TitleGroups | None = None, items: np.ndarray | None = None,
                       users: np.ndarray | None = None,
                       ks: Sequence[int] = DEFAULT_KS, progress: bool = False,
                       domain: PromptDomain = GAMES) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Recall@K / NDCG@K of the retrieval head, and its full-catalogue loss (``eval-loss``).

    `items` / `users`: precomputed item and user vectors for the current adapter (e.g. from
    a cached frozen prefix); else they are computed here.
    Returns (metrics, rows) like `evaluate.evaluate_recommender`: rows hold user_id,
    target, top10, target_rank (0-based, -1 = not in the top max(ks)) and target_masked.
    """
    if not ks or min(ks) < 1:
        raise RetrievalError(f"ks={list(ks)} must be a non-empty list of positive cut-offs.")
    if not examples:
        raise RetrievalError("evaluate_retrieval got no examples.")
    groups = groups or TitleGroups.from_titles(titles)
    if items is None:
        items = item_vectors(model, tokenizer, groups, settings, max_length, batch_size, progress)
    targets = np.array([int(ex.target) for ex in examples], dtype=np.int64)
    target_groups = groups.group_index(targets)
    histories = [list(ex.history) for ex in examples]
    masks = groups.history_mask(histories)
    if users is None:
        users = user_vectors(model, tokenizer, [lookup_titles(h, titles) for h in histories], settings, max_length,
                             batch_size, progress, domain)
    elif len(users) != len(examples):
        raise RetrievalError(f"got {len(users)} user vectors for {len(examples)} examples.")
    ranked = Catalogue(groups, items).rank(users, histories, max(ks))
    ranks = target_ranks(ranked, targets, canonical=groups.canonical)
    metrics = ranking_metrics(ranks, ks)
    losses = full_catalogue_loss(users, items, target_groups, masks, settings.temperature)
    metrics["eval-loss"] = float(losses.mean())
    rows = [{"user_id": int(ex.user_id), "target": int(ex.target), "top10": ranked[r, :10].tolist(),
             "target_rank": int(ranks[r]), "target_masked": bool(masks[r, target_groups[r]])}
            for r, ex in enumerate(examples)]
    return metrics, rows


def popularity_grounded_ranks(user_vecs: np.ndarray, item_vecs: np.ndarray, temperature: float, gamma: float,
                              group_counts: np.ndarray, history_masks: np.ndarray, target_groups: np.ndarray,
                              k: int) -> np.ndarray:
    """0-based rank of each user's target group (-1 = not in the top k) under BIGRec-style popularity
    injection: score = cos(user, item) / temperature + gamma * log(1 + training count of the group).

    gamma = 0 is the retrieval head alone (the cosine ranking of `evaluate_retrieval`); a
    large gamma approaches the popularity baseline. History groups are masked, never the
    target's rank counted past them (a target inside the history is a miss, as in grounding).
    """
    check_temperature(temperature)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise RetrievalError(f"gamma={gamma} must be a finite number >= 0.")
    scores = np.asarray(user_vecs, dtype=np.float64) @ np.asarray(item_vecs, dtype=np.float64).T / temperature
    if gamma:
        scores = scores + gamma * np.log1p(np.asarray(group_counts, dtype=np.float64))[None, :]
    return target_ranks_from_scores(scores, history_masks, target_groups, k)
