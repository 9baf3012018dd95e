"""The item-token head (``model.head='item'``): every history item is one vector, the LLM's top
layers model the sequence, and a softmax over the whole catalogue picks the next item.

Why: the text heads feed ~15 tokens per history title through the whole model (about 150
positions per user), which made one epoch over Games cost ~17 CPU-hours. Here (E4SRec / LLaRA
style, with RecFormer's frozen item vectors and SASRec's full-softmax cross-entropy):

- each title group's **item vector** is computed once by the frozen base model: the hidden
  states entering decoder layer ``L - k`` (the "cut"), mean-pooled over the title's tokens (BOS
  left out: it is the attention sink and would dominate the mean). The catalogue is public, so
  the vectors are cached on disk, keyed by the model's weights, the catalogue and the method
  (:func:`catalogue_vectors`);
- a user's history enters the **top k decoder layers** (pretrained, frozen, LoRA on them) as one
  position per item: ``vector + item_in(key) + id_proj(id_emb[item])`` — the text vector plus
  trainable corrections and a learned collaborative (item-id) embedding, LLaRA's hybrid;
- the final norm's output at each position scores every title group against the item table
  ``item_out(key) + id_proj(id_emb[item])``, where a key is the item vector with every dimension
  standardised over the catalogue (:func:`standardised`; deep hidden states are anisotropic) (input and output share the id embedding, as
  SASRec ties its item embedding);
- training is causal over a user's whole training sequence: one forward gives the loss of every
  window (``data.history-len`` items of history at most, :func:`sequence_chunks`), so every window
  of every client is used at the cost of one pass per user.

What a client holds: the top k layers, the final norm, the (public) item vectors and its
trainable state. What crosses the network: the trainable state only — LoRA of the top layers,
``item_in``/``item_out``/``id_proj`` and the id table ``id_emb`` — which every strategy sees as
arrays. No split service is involved (the client already holds only k layers), so no activation
or gradient of a user's history leaves the client; but the rows of ``id_emb`` that a client's
training moved name the items its users interacted with (a known leak of federated id
embeddings; docs/results.md "Item-token head").

Title groups (items sharing a title, `fellrec_flwr.eval.grounding.TitleGroups`) are the
catalogue entries: the vocabulary of the softmax, the masking of history items and the hit
semantics are exactly those of every other method in this project.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fellrec_flwr.config import ItemHeadSettings, LoraSettings, TrainSettings
from fellrec_flwr.data.collate import bucketed_batches
from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.eval.metrics import DEFAULT_KS, ranking_metrics, target_ranks_from_scores
from fellrec_flwr.progress import tqdm
from fellrec_flwr.seeding import derive_seed, seeded_torch, torch_generator
from fellrec_flwr.train.trainer import TrainingError, TrainResult, _check_factors, lr_factor, proximal_term

log = logging.getLogger(__name__)

VECTOR_METHOD = "mean-pool-at-cut-without-bos-v1"  # part of the cache key: change it when the method changes
TRAINABLE_MODULES = ("item_in", "item_out", "id_emb", "id_proj")  # besides LoRA: peft's modules_to_save
IGNORE = -100
BUCKET_BATCHES = 50  # with train.length-bucketing: batches sorted by length within groups of this many


class ItemHeadError(ValueError):
    """Bad input to the item-token head: unknown items, empty histories, a foreign cache, bad shapes."""


# --------------------------------------------------------------------------- pure pieces


def sequence_chunks(seq: Sequence[int], window: int) -> list[tuple[list[int], list[int], int]]:
    """Split one training sequence into causal chunks that cover every window exactly once.

    Returns ``(inputs, targets, first)`` per chunk: position p of `inputs` predicts
    ``targets[p]`` (the next item) with the items ``inputs[:p + 1]`` as history; only positions
    ``p >= first`` carry a loss. Every target ``seq[j]`` (j >= 1) gets a loss exactly once, with
    the last ``min(j, window)`` items before it as history when it is among the first `window`
    targets and at least ``window - window // 2`` of them after (chunks advance by half a window).
    """
    if window < 1:
        raise ItemHeadError(f"window={window} must be >= 1.")
    seq = [int(x) for x in seq]
    n = len(seq)
    if n < 2:
        return []
    stride = max(1, window // 2)
    chunks: list[tuple[list[int], list[int], int]] = []
    covered = 0  # targets seq[1..covered] already have their loss
    end = min(window, n - 1)  # index of the last target of this chunk
    while True:
        start = max(0, end - window)
        chunks.append((seq[start:end], seq[start + 1:end + 1], max(0, covered - start)))
        covered = end
        if end == n - 1:
            return chunks
        end = min(end + stride, n - 1)


def pad_chunks(chunks: Sequence[tuple[Sequence[int], Sequence[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) [B, T], right padded: inputs with `pad`, labels with IGNORE (also before `first`)."""
    width = max(len(c[0]) for c in chunks)
    inputs = torch.full((len(chunks), width), pad, dtype=torch.long)
    labels = torch.full((len(chunks), width), IGNORE, dtype=torch.long)
    for row, (x, y, first) in enumerate(chunks):
        inputs[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        labels[row, first: len(y)] = torch.tensor(list(y)[first:], dtype=torch.long)
    return inputs, labels


def group_sequences(sequences: Mapping[int, Sequence[int]], groups: TitleGroups) -> list[list[int]]:
    """Item-id sequences as title-group sequences; an unknown item id raises, naming it.

    Consecutive repeats of one group (re-releases of the same title) collapse to one entry."""
    out = []
    for user, seq in sequences.items():
        if not len(seq):
            raise ItemHeadError(f"user {user} has an empty training sequence; every user needs at least one item.")
        g = _groups_of(seq, groups, f"user {user}")
        out.append([int(x) for i, x in enumerate(g) if i == 0 or x != g[i - 1]])
    return out


def _groups_of(items: Sequence[int], groups: TitleGroups, who: str) -> np.ndarray:
    ids = np.asarray([int(i) for i in items], dtype=np.int64)
    bad = ids[(ids < 0) | (ids >= len(groups.group_of))]
    if len(bad) == 0:
        g = groups.group_of[ids]
        bad = ids[g < 0]
    if len(bad):
        raise ItemHeadError(f"{who}: item id {int(bad[0])} is not in the catalogue (items table); the data and "
                            "the catalogue must come from the same prepared folder.")
    return groups.group_of[ids]


# --------------------------------------------------------------------------- the model


class ItemSequenceModel(nn.Module):
    """The top k decoder layers of a LLaMA-family model over one vector per history item.

    ``title_vectors`` (G, d) are a frozen buffer (public, recomputable); row G of the id
    table is the padding entry. Trainable: LoRA on ``layers`` (added by peft) and the modules
    in TRAINABLE_MODULES (peft's modules_to_save, so the adapter state carries them).
    """

    def __init__(self, config: Any, layers: nn.ModuleList, norm: nn.Module, title_vectors: torch.Tensor,
                 id_dim: int) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = config
        num_groups, text_dim = title_vectors.shape
        hidden = config.hidden_size
        self.layers, self.norm = layers, norm
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.register_buffer("title_vectors", title_vectors.float(), persistent=False)
        # the scoring side sees each dimension standardised over the catalogue: deep hidden states are
        # anisotropic (on SmolLM2 at layer 28 a few dimensions reach 10^4 and the catalogue mean dominates
        # every dot product), which made raw-vector logits of 10^2-10^3 and a model that learned nothing
        self.register_buffer("title_keys", standardised(title_vectors.float()), persistent=False)
        self.item_in = nn.Linear(text_dim, hidden, bias=False)
        self.item_out = nn.Linear(text_dim, hidden, bias=False)
        self.id_emb = nn.Embedding(num_groups + 1, id_dim, padding_idx=num_groups)
        self.id_proj = nn.Linear(id_dim, hidden, bias=False)
        self.reset_trainable()

    @property
    def num_groups(self) -> int:
        return int(self.title_vectors.shape[0])

    def reset_trainable(self) -> None:
        """The seeded start (call under `seeded_torch`): `item_in` and `item_out` are zero (an item
        enters the top layers as its raw vector, the state they were trained on, and every item starts
        equally likely: the loss at log G); the id parts are small."""
        with torch.no_grad():
            self.item_in.weight.zero_()
            self.item_out.weight.zero_()
            nn.init.normal_(self.id_emb.weight, std=0.02)
            self.id_emb.weight[self.num_groups].zero_()
            nn.init.normal_(self.id_proj.weight, std=0.02)

    def _rows(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows of a (G, d) table at `index`, zero for the padding index G (no padded copy of the table)."""
        real = (index < self.num_groups).unsqueeze(-1).to(table.dtype)
        return table[index.clamp(max=self.num_groups - 1)] * real

    def item_inputs(self, index: torch.Tensor) -> torch.Tensor:
        """[B, T] title-group indices (G = padding) -> [B, T, hidden] inputs of the top layers: the raw
        item vector (the state these layers were trained on) plus trainable corrections computed from
        the standardised key (well conditioned: a raw dimension reaches 10^4) and from the id embedding."""
        keys = self._rows(self.title_keys, index)
        return self._rows(self.title_vectors, index) + self.item_in(keys) + self.id_proj(self.id_emb(index))

    def item_table(self) -> torch.Tensor:
        """(G, hidden) output embedding of every title group."""
        every = torch.arange(self.num_groups, device=self.title_vectors.device)
        return self.item_out(self.title_keys) + self.id_proj(self.id_emb(every))

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """(P, hidden) states -> (P, G) logits, equal to ``states @ item_table().T`` but computed as
        ``(states W_out) V^T + (states W_id) E^T``: the catalogue is never projected (that projection,
        G x d x d per step, cost more than the rest of a training step)."""
        text = (states @ self.item_out.weight) @ self.title_keys.T
        ids = (states @ self.id_proj.weight) @ self.id_emb.weight[: self.num_groups].T
        return text + ids

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """[B, T] right-padded group indices -> [B, T, hidden] normed states (causal: padding after
        a row's items is never attended to by them)."""
        from fellrec_flwr.split.plan import attention_bias

        if index.dim() != 2:
            raise ItemHeadError(f"expected [batch, positions] item indices, got shape {list(index.shape)}.")
        hidden = self.item_inputs(index)
        b, t = index.shape
        positions = torch.arange(t, device=index.device)[None].expand(b, t)
        position_embeddings = self.rotary_emb(hidden, position_ids=positions)
        bias = attention_bias(None, b, t, 0, hidden.dtype, hidden.device,
                              additive=getattr(self.config, "_attn_implementation", "sdpa") == "eager")
        for layer in self.layers:
            out = layer(hidden, attention_mask=bias, position_ids=positions, position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.norm(hidden)


def standardised(vectors: torch.Tensor) -> torch.Tensor:
    """Each dimension centred and scaled to unit variance over the rows (a constant dimension stays 0)."""
    centred = vectors - vectors.mean(0, keepdim=True)
    return centred / centred.std(0, keepdim=True).clamp_min(1e-6)


def peft_item_config(lora: LoraSettings) -> Any:
    """LoRA on the top layers' projections + the head's own modules, trained and sent whole."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_list(),
                      modules_to_save=list(TRAINABLE_MODULES), bias="none")


def wrap_with_lora(model: ItemSequenceModel, lora: LoraSettings, seed: int) -> Any:
    """The peft model every process builds the same way: same seed -> same trainable start."""
    from peft import get_peft_model

    if lora.layer_list() is not None:
        raise ItemHeadError("lora.layers does not apply to model.head='item' (LoRA sits on the "
                            "item-head.layers top layers); leave lora.layers empty.")
    for p in model.parameters():
        p.requires_grad_(False)
    with seeded_torch(derive_seed(seed, "item-head")):
        model.reset_trainable()
        return get_peft_model(model, peft_item_config(lora))


def build_item_model(config: Any, layer_states: Sequence[Mapping[str, torch.Tensor]] | None,
                     norm_state: Mapping[str, torch.Tensor] | None, title_vectors: torch.Tensor,
                     settings: ItemHeadSettings, lora: LoraSettings, seed: int) -> Any:
    """The head with its top layers' weights (None: zeros, enough for the trainable start's shapes)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    k = settings.layers
    check_layers(settings, config.num_hidden_layers)
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "sdpa"
    layers = nn.ModuleList(LlamaDecoderLayer(config, config.num_hidden_layers - k + i) for i in range(k))
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if layer_states is None:
                for p in layer.parameters():
                    p.zero_()
            else:
                layer.load_state_dict(layer_states[i])
        if norm_state is not None:
            norm.load_state_dict(norm_state)
    model = ItemSequenceModel(config, layers, norm, title_vectors, settings.id_dim)
    return wrap_with_lora(model, lora, seed)


def check_layers(settings: ItemHeadSettings, num_layers: int) -> None:
    if not 1 <= settings.layers < num_layers:
        raise ItemHeadError(f"item-head.layers={settings.layers} must be between 1 and {num_layers - 1}: the model has "
                            f"{num_layers} decoder layers and at least one must stay below the cut to encode titles.")


# --------------------------------------------------------------------------- loss, training, evaluation


def chunk_loss(model: Any, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of full-catalogue cross-entropies over the labelled positions, and their count."""
    device = model_device(model)
    states = model(inputs.to(device))
    picked = labels.to(device) != IGNORE
    logits = model.scores(states[picked])
    return F.cross_entropy(logits.float(), labels.to(device)[picked], reduction="sum"), int(picked.sum())


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_item_head(model: Any, sequences: Sequence[Sequence[int]], train_cfg: TrainSettings,
                    settings: ItemHeadSettings, seed: int, proximal_mu: float = 0.0, lr_scale: float = 1.0,
                    progress: bool = True,
                    on_step: Callable[[int, float, int], None] | None = None) -> TrainResult:
    """`train.local-epochs` passes over every window of `sequences` (title-group sequences).

    One optimiser step per `train.batch-size` chunks; the loss is the mean cross-entropy over the
    step's windows. ``num_examples`` is the number of windows (the FedAvg weight).
    `on_step(step, loss, windows seen so far)` is called after every step (learning curves).
    """
    _check_factors(proximal_mu, lr_scale)
    chunks = [c for seq in sequences for c in sequence_chunks(seq, settings.window)]
    if not chunks:
        raise TrainingError("train_item_head got no training window: a client needs a user with at least two "
                            "training items.")
    windows = sum(len(y) - first for _, y, first in chunks)
    lengths = [len(x) for x, _, _ in chunks]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr * lr_scale, weight_decay=train_cfg.weight_decay)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    shuffle = torch_generator(derive_seed(seed, "shuffle"))
    size = train_cfg.batch_size
    steps_per_epoch = math.ceil(len(chunks) / size)
    total = steps_per_epoch * train_cfg.local_epochs
    was_training = model.training
    model.train()
    losses: list[float] = []
    seen = 0
    bar = tqdm(total=total, desc="item-head training", disable=not progress, leave=False)
    try:
        with seeded_torch(derive_seed(seed, "dropout")):
            for _ in range(train_cfg.local_epochs):
                order = torch.randperm(len(chunks), generator=shuffle).tolist()
                # train.length-bucketing: chunks of similar length together (less padding through the layers)
                batches = bucketed_batches(lengths, order, size, BUCKET_BATCHES if train_cfg.length_bucketing else 1,
                                           shuffle)
                for batch in batches:
                    for group in optimizer.param_groups:
                        group["lr"] = train_cfg.lr * lr_scale * lr_factor(len(losses), total, train_cfg.warmup_steps,
                                                                          train_cfg.lr_schedule)
                    inputs, labels = pad_chunks([chunks[i] for i in batch], model.num_groups)
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum, count = chunk_loss(model, inputs, labels)
                    loss = loss_sum / count
                    if proximal_mu > 0:
                        (loss + proximal_term(params, anchors, proximal_mu)).backward()
                    else:
                        loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    seen += count
                    bar.update(1)
                    if on_step is not None:
                        on_step(len(losses), losses[-1], seen)
    finally:
        bar.close()
        model.train(was_training)
    return TrainResult(loss=sum(losses) / len(losses), steps=len(losses), num_examples=windows)


@torch.no_grad()
def user_states(model: Any, histories: Sequence[Sequence[int]], batch_size: int = 256) -> torch.Tensor:
    """(U, hidden) state at each history's last item (histories as title-group sequences)."""
    if any(len(h) == 0 for h in histories):
        raise ItemHeadError("a user has an empty history; the item head needs at least one history item.")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(histories), batch_size):
            batch = histories[start:start + batch_size]
            inputs, _ = pad_chunks([(list(h), list(h), 0) for h in batch], model.num_groups)
            states = model(inputs.to(model_device(model)))
            last = torch.tensor([len(h) - 1 for h in batch], device=states.device)
            out.append(states[torch.arange(len(batch), device=states.device), last].float())
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def item_scores(model: Any, histories: Sequence[Sequence[int]], batch_size: int = 256) -> np.ndarray:
    """(U, G) float32 scores of every title group for each history (title-group sequences)."""
    states = user_states(model, histories, batch_size)
    return model.scores(states).float().cpu().numpy()


def evaluate_item_head(model: Any, examples: Sequence[Any], groups: TitleGroups, ks: Sequence[int] = DEFAULT_KS,
                       batch_size: int = 256) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Recall@K / NDCG@K over the whole catalogue (history groups masked) and ``eval-loss``: the
    full-catalogue cross-entropy of the target with history groups (never the target) left out.

    Rows (as `evaluate.evaluate_recommender`): user_id, target, top10, target_rank (-1 = not in
    the top max(ks)), target_masked."""
    if not examples:
        raise ItemHeadError("evaluate_item_head got no examples.")
    histories = [_groups_of(ex.history, groups, f"user {ex.user_id}'s history").tolist() for ex in examples]
    target_groups = _groups_of([ex.target for ex in examples], groups, "the targets")
    masks = groups.history_mask([list(ex.history) for ex in examples])
    rows: list[dict[str, Any]] = []
    ranks_all, losses = [], []
    k = max(ks)
    for start in range(0, len(examples), batch_size):
        sl = slice(start, start + batch_size)
        scores = item_scores(model, histories[sl], batch_size).astype(np.float64)
        mask, tg = masks[sl], target_groups[sl]
        ranks = target_ranks_from_scores(scores, mask, tg, k)
        losses.append(masked_cross_entropy(scores, mask, tg))
        ranks_all.append(ranks)
        masked = np.where(mask, -np.inf, scores)
        top = np.argsort(-masked, axis=1, kind="stable")[:, :10]
        for r, ex in enumerate(examples[sl]):
            rows.append({"user_id": int(ex.user_id), "target": int(ex.target),
                         "top10": groups.rep_ids[top[r]].tolist(), "target_rank": int(ranks[r]),
                         "target_masked": bool(mask[r, tg[r]])})
    metrics = ranking_metrics(np.concatenate(ranks_all), ks)
    metrics["eval-loss"] = float(np.concatenate(losses).mean())
    return metrics, rows


def masked_cross_entropy(scores: np.ndarray, masks: np.ndarray, target_groups: np.ndarray) -> np.ndarray:
    """Per-row -log softmax(scores)[target] over the groups not masked (the target never is)."""
    logits = np.array(scores, dtype=np.float64, copy=True)
    rows = np.arange(len(logits))
    drop = np.array(masks, dtype=bool, copy=True)
    drop[rows, target_groups] = False
    logits[drop] = -np.inf
    top = logits.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)) - logits[rows, target_groups]


# --------------------------------------------------------------------------- item vectors (public, cached)


def vectors_key(checkpoint_id: Mapping[str, Any], titles: Sequence[str], cut: int, settings: ItemHeadSettings) -> str:
    """What the item vectors depend on: the model's weights (below the cut), the catalogue's titles,
    the cut and the method. No adapter: LoRA sits above the cut, the vectors come from frozen layers."""
    blob = json.dumps({"model": checkpoint_id, "titles": hashlib.sha256("\n".join(titles).encode()).hexdigest(),
                       "cut": cut, "title_tokens": settings.title_tokens, "method": VECTOR_METHOD,
                       "adapter": "none (LoRA is above the cut)"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def checkpoint_identity(folder: Path) -> dict[str, Any]:
    """The checkpoint's config and a probe of weight values (first rows, read without loading the model)."""
    from fellrec_flwr.split.plan import checkpoint_probe, safetensors_files

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.pop("_name_or_path", None)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             f"model.layers.{int(config['num_hidden_layers']) - 1}.mlp.down_proj.weight", "model.norm.weight"]
    sizes = {f.name: f.stat().st_size for f in safetensors_files(folder)}
    return {"config": config, "probe": checkpoint_probe(folder, names), "files": sizes}


def save_vectors(path: Path, vectors: np.ndarray, key: str) -> None:
    from safetensors.numpy import save

    from fellrec_flwr.atomic import atomic_write_bytes

    atomic_write_bytes(path, save({"vectors": np.ascontiguousarray(vectors, dtype=np.float32)},
                                  metadata={"key": key, "method": VECTOR_METHOD}))


def load_vectors(path: Path, key: str, num_groups: int) -> np.ndarray:
    """The cached vectors, after checking they were made for this model, catalogue and method."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            vectors = fh.get_tensor("vectors")
    except Exception as err:  # noqa: BLE001 -- a truncated or foreign file: one clear message
        raise ItemHeadError(f"{path} is not a readable item-vector cache ({type(err).__name__}); delete it and "
                            "run again to recompute.") from err
    if meta.get("key") != key:
        raise ItemHeadError(f"{path} holds item vectors of another model, catalogue or method (key "
                            f"{meta.get('key')!r}, expected {key!r}); delete it and run again to recompute.")
    if vectors.ndim != 2 or vectors.shape[0] != num_groups or not np.isfinite(vectors).all():
        raise ItemHeadError(f"{path} holds vectors of shape {vectors.shape} (or non-finite values); expected "
                            f"({num_groups}, d). Delete it and run again.")
    return vectors


@torch.no_grad()
def encode_titles_at(model: Any, tokenizer: Any, titles: Sequence[str], cut: int, title_tokens: int,
                     batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """(n, d) mean of the hidden states entering layer `cut` over each title's tokens (BOS excluded)."""
    from fellrec_flwr.data.collate import pad_token_id_of
    from fellrec_flwr.model.speed import layer_range

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = []
    for title in titles:
        body = tokenizer(title, add_special_tokens=False)["input_ids"][:title_tokens]
        if not body:
            raise ItemHeadError(f"title {title!r} encodes to no tokens; every catalogue item needs a title.")
        ids.append(([bos] if bos is not None else []) + body)
    skip = 1 if bos is not None else 0
    pad = pad_token_id_of(tokenizer)
    order = np.argsort([len(t) for t in ids], kind="stable")
    out = np.empty((len(ids), model.config.hidden_size), dtype=np.float32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with layer_range(decoder, 0, cut, final_norm=False):
            for start in tqdm(range(0, len(order), batch_size), desc="item vectors", disable=not progress,
                              unit="batch"):
                batch = order[start:start + batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros_like(input_ids)
                for row, i in enumerate(batch):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    attention[row, : len(ids[i])] = 1
                hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 use_cache=False).last_hidden_state.float()
                keep = attention.to(device).float()
                keep[:, :skip] = 0
                out[batch] = ((hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)).cpu().numpy()
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class HeadParts:
    """What a client of the item head holds: the top layers, the norm, the model config, the vectors."""

    config: Any
    layer_states: list[dict[str, torch.Tensor]]
    norm_state: dict[str, torch.Tensor]
    title_vectors: np.ndarray


def load_top_layers(folder: Path, k: int) -> tuple[Any, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(config, state of each of the last k decoder layers, final norm state), read from the
    safetensors checkpoint without building the rest of the model."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from fellrec_flwr.split.plan import safetensors_files

    config = AutoConfig.from_pretrained(str(folder))
    n = config.num_hidden_layers
    wanted = {f"model.layers.{n - k + i}.": i for i in range(k)}
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    norm: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                if key == "model.norm.weight":
                    norm["weight"] = fh.get_tensor(key).float()
                for prefix, i in wanted.items():
                    if key.startswith(prefix):
                        layers[i][key[len(prefix):]] = fh.get_tensor(key).float()
    if not norm or any(not s for s in layers):
        raise ItemHeadError(f"{folder} lacks the final norm or one of the last {k} decoder layers.")
    return config, layers, norm


def catalogue_vectors(folder: Path, groups: TitleGroups, settings: ItemHeadSettings, cache_dir: Path,
                      load_model: Callable[[], tuple[Any, Any]], progress: bool = True) -> np.ndarray:
    """(G, d) item vectors of every title group: read from `cache_dir` when a file with this key
    exists, else computed with the full model (`load_model()`) and written atomically.

    Computed by whichever process first needs them, once per machine and catalogue, under a
    file lock so that simulated clients starting together do not all compute them."""
    from fellrec_flwr.atomic import file_lock

    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(str(folder)).num_hidden_layers
    check_layers(settings, num_layers)
    cut = num_layers - settings.layers
    key = vectors_key(checkpoint_identity(folder), list(groups.titles), cut, settings)
    path = Path(cache_dir) / f"item-vectors-{key}.safetensors"
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            return load_vectors(path, key, len(groups))
        t0 = time.process_time()
        model, tokenizer = load_model()
        vectors = encode_titles_at(model, tokenizer, list(groups.titles), cut, settings.title_tokens,
                                   progress=progress)
        del model
        save_vectors(path, vectors, key)
        log.info("item vectors: %d title groups at layer %d computed in %.0f CPU-s -> %s", len(groups), cut,
                 time.process_time() - t0, path)
        return vectors
