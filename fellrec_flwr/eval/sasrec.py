"""SASRec, the sequential baseline: causal self-attention over a user's title groups.

Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018), as in the
reference implementation pmixer/SASRec.pytorch (pre-norm blocks, a learned positional
embedding, the item embedding tied to the output), trained with full-catalogue softmax
cross-entropy (arXiv 2408.14238) instead of one sampled negative.

Vocabulary: the title groups of `fellrec_flwr.eval.grounding.TitleGroups` (token g + 1 for
group g; 0 is padding), so SASRec ranks exactly what every other method ranks: a list holds
distinct titles, each reported by its group's smallest item id; the user's history groups
are masked; a hit is at the target group's position.

Training data: every position of every user's training sequence (``train_sequences``,
without the valid/test targets); a sequence longer than ``sasrec.max-len`` + 1 is cut into
consecutive windows so that no position is left out. Adam, gradient clipping, and the epoch
with the best valid metric (``sasrec.select-metric`` on the prepared valid split) is kept,
with early stopping after ``sasrec.patience`` epochs without improvement.

Sequences are padded on the LEFT and padded keys are masked in attention, so a sequence's
scores do not depend on how much padding its batch has: the last real item always sits
at position ``max-len - 1``.

Everything runs on the CPU (the ServerApp must not open a CUDA context for a baseline) with
the process's torch thread setting, from a private RNG seeded by ``sasrec.seed`` (not the run
seed, so runs of every seed compare with one baseline): the same data, settings and seed give
the same model. `load_or_train` caches the trained model in
``<prepared>/baselines/sasrec-<key>.safetensors``; the key covers what SASRec reads (the users'
training sequences, the valid split and the titles, not how users are partitioned into clients),
the settings and the seed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fellrec_flwr.atomic import atomic_write_bytes
from fellrec_flwr.config import SasrecSettings
from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.eval.metrics import ranking_metrics, target_ranks
from fellrec_flwr.eval.popularity import _sequences
from fellrec_flwr.progress import tqdm

log = logging.getLogger("flwr")  # the logger a run's console shows (ServerApp and the CLI)

CACHE_VERSION = "sasrec-v3"  # part of the cache key: change it when the model or training changes
CACHE_FOLDER = "baselines"
EVAL_BATCH = 512


class SasrecError(ValueError):
    """Bad input to SASRec or an unusable cache file."""


# ---------------------------------------------------------------------------
# Data (pure)
# ---------------------------------------------------------------------------


def group_tokens(items: Sequence[int], groups: TitleGroups) -> np.ndarray:
    """Item ids -> tokens (title group + 1; 0 is padding)."""
    if not len(items):
        return np.zeros(0, dtype=np.int64)
    return groups.group_index([int(i) for i in items]) + 1


def training_windows(train_sequences: Any, groups: TitleGroups, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) token windows covering every next-item position once.

    A sequence of n items has n - 1 next-item positions; they are cut, from the end, into
    blocks of at most `max_len`; a block's inputs are the items just before its targets.
    """
    out = []
    for items in _sequences(train_sequences):
        tokens = group_tokens(items, groups)
        end = len(tokens) - 1  # targets tokens[1:end + 1]
        while end >= 1:
            start = max(0, end - max_len)
            out.append((tokens[start:end], tokens[start + 1:end + 1]))
            end = start
    return out


def left_pad(rows: Sequence[np.ndarray], length: int | None = None) -> torch.Tensor:
    """(B, L) int64, each row right-aligned, 0 before it; L = the longest row unless given."""
    length = max((len(r) for r in rows), default=0) if length is None else length
    out = np.zeros((len(rows), max(length, 1)), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-length:] if length else r[:0]
        if len(r):
            out[i, -len(r):] = r
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class SASRec(nn.Module):
    """Token embedding (tied to the output) + positional embedding + causal pre-norm blocks."""

    def __init__(self, num_groups: int, s: SasrecSettings) -> None:
        super().__init__()
        self.num_groups, self.max_len, self.heads = num_groups, s.max_len, s.heads
        self.item_emb = nn.Embedding(num_groups + 1, s.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(s.max_len, s.hidden)
        self.emb_dropout = nn.Dropout(s.dropout)
        # torch's encoder layer is the SASRec block: attention + point-wise feed-forward, pre-norm, residuals
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(s.hidden, s.heads, dim_feedforward=s.hidden, dropout=s.dropout,
                                       activation="relu", batch_first=True, norm_first=True)
            for _ in range(s.blocks))
        self.final_norm = nn.LayerNorm(s.hidden)
        self._init(s.init_std)

    def _init(self, std: float) -> None:
        # a small normal init (std 0.02) keeps full-softmax training from diverging early
        for name, p in self.named_parameters():
            if "norm" in name:
                continue  # LayerNorm: weight 1, bias 0
            if p.dim() >= 2:
                nn.init.normal_(p, std=std)
            else:
                nn.init.zeros_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded tokens -> (B, L, H) states; position i predicts the token after it."""
        b, length = tokens.shape
        if length > self.max_len:
            raise SasrecError(f"sequence of {length} tokens exceeds sasrec.max-len={self.max_len}.")
        real = tokens > 0
        # the last slot is always position max_len - 1, whatever the padding
        positions = torch.arange(self.max_len - length, self.max_len, device=tokens.device)
        x = self.item_emb(tokens) * self.item_emb.embedding_dim ** 0.5 + self.pos_emb(positions)
        x = self.emb_dropout(x) * real.unsqueeze(-1)
        # True = may not attend: a later position, or a padded one (a padded query attends to itself,
        # so no row is all-masked; its output is zeroed and never used)
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
        blocked = causal | ~real[:, None, :]
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=tokens.device)
        mask = blocked.repeat_interleave(self.heads, dim=0)  # (B * heads, L, L)
        for block in self.blocks:
            x = block(x, src_mask=mask) * real.unsqueeze(-1)
        return self.final_norm(x)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., G): a score for every title group (the tied embedding, padding row left out)."""
        return states @ self.item_emb.weight[1:].T

    def last_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G) scores of the next title group after each row's last item."""
        return self.logits(self.encode(tokens)[:, -1])


def sasrec_loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over all title groups, at every non-padded position."""
    states = model.encode(inputs)
    real = targets > 0
    return F.cross_entropy(model.logits(states[real]), targets[real] - 1)


# ---------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------


@torch.no_grad()
def rank_sasrec(model: SASRec, examples: Sequence[Any], groups: TitleGroups, k: int,
                batch_size: int = EVAL_BATCH) -> np.ndarray:
    """(users, k) item ids (each group's representative), best first, the user's history groups masked.

    The input is the example's history (the same items every other method sees), its last
    `max-len` items at most.
    """
    if len(groups) != model.num_groups:
        raise SasrecError(f"the model has {model.num_groups} title groups, the catalogue {len(groups)}: "
                          "use the model trained on this prepared data (load_or_train).")
    was_training = model.training
    model.eval()
    k_eff = min(k, len(groups))
    out = np.full((len(examples), k), -1, dtype=np.int64)
    try:
        for start in range(0, len(examples), batch_size):
            part = examples[start:start + batch_size]
            histories = [group_tokens(ex.history, groups) for ex in part]
            scores = model.last_scores(left_pad(histories, min(model.max_len, max(len(h) for h in histories))))
            for row, h in enumerate(histories):
                if len(h):
                    scores[row, torch.from_numpy(h - 1)] = -torch.inf
            top = torch.topk(scores, k_eff, dim=1)
            ids = groups.rep_ids[top.indices.numpy()]
            ids[~torch.isfinite(top.values).numpy()] = -1  # fewer than k unseen groups
            out[start:start + len(part), :k_eff] = ids
    finally:
        model.train(was_training)
    return out


def sasrec_ranks(model: SASRec, examples: Sequence[Any], groups: TitleGroups, k: int) -> np.ndarray:
    """Per-user 0-based rank of the target's group in the top-k (-1 = not there)."""
    targets = np.array([int(ex.target) for ex in examples], dtype=np.int64)
    groups.group_index(targets)  # unknown targets: a clear error
    return target_ranks(rank_sasrec(model, examples, groups, k), targets, canonical=groups.canonical)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@dataclass
class TrainingRecord:
    """What a training run did: the valid metric after each epoch and the epoch kept (1-based)."""

    metric: str
    curve: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0

    @property
    def best_value(self) -> float:
        return self.curve[self.best_epoch - 1] if self.best_epoch else float("nan")


def should_stop(curve: Sequence[float], patience: int) -> bool:
    """True when the last `patience` epochs brought no improvement over the best before them."""
    if patience <= 0 or len(curve) <= patience:
        return False
    return max(curve[-patience:]) <= max(curve[:-patience])


def length_batches(lengths: np.ndarray, batch_size: int, generator: torch.Generator,
                   chunk_batches: int = 64) -> list[list[int]]:
    """Every index once, in batches of similar length (less padding), in a random order.

    Shuffle, sort each chunk of `chunk_batches` batches by length, cut it into batches, then
    shuffle the batches: most Games windows hold 3 items, a few 50, and a batch costs its longest.
    """
    order = torch.randperm(len(lengths), generator=generator).numpy()
    batches = []
    chunk = batch_size * chunk_batches
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train_sasrec(train_sequences: Any, groups: TitleGroups, s: SasrecSettings, seed: int,
                 evaluate: Callable[[SASRec], float]) -> tuple[SASRec, TrainingRecord]:
    """Train on every next-item position; keep the epoch with the highest `evaluate(model)`.

    `evaluate` returns the valid metric of the model (put in eval mode by the caller here);
    ties keep the earlier epoch.
    """
    windows = training_windows(train_sequences, groups, s.max_len)
    if not windows:
        raise SasrecError("no training sequence has two items: SASRec has nothing to learn from.")
    lengths = np.array([len(w[0]) for w in windows])
    record = TrainingRecord(metric=s.select_metric)
    t0 = time.process_time()
    # a private RNG (CPU only: no CUDA context) for the init, shuffling and dropout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SASRec(len(groups), s)
        best_state = copy.deepcopy(model.state_dict())
        optimiser = torch.optim.Adam(model.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=s.weight_decay)
        shuffle = torch.Generator().manual_seed(seed)
        bar = tqdm(range(1, s.max_epochs + 1), desc="SASRec", unit="epoch")
        for epoch in bar:
            model.train()
            total, count = 0.0, 0
            for batch_ids in length_batches(lengths, s.batch_size, shuffle):
                batch = [windows[i] for i in batch_ids]
                loss = sasrec_loss(model, left_pad([w[0] for w in batch]), left_pad([w[1] for w in batch]))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if s.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
                optimiser.step()
                total, count = total + loss.item() * len(batch), count + len(batch)
            model.eval()
            value = float(evaluate(model))
            record.losses.append(total / count)
            record.curve.append(value)
            if value > record.best_value or not record.best_epoch:
                record.best_epoch = epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(loss=f"{total / count:.4f}", **{f"valid-{s.select_metric}": f"{value:.4f}"})
            if should_stop(record.curve, s.patience):
                break
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    record.seconds = time.process_time() - t0
    return model, record


def valid_metric(examples: Sequence[Any], groups: TitleGroups, metric: str) -> Callable[[SASRec], float]:
    """`evaluate` for `train_sasrec`: `metric` (e.g. "ndcg@10") of the model on `examples`."""
    k = int(metric.partition("@")[2])

    def evaluate(model: SASRec) -> float:
        return ranking_metrics(sasrec_ranks(model, examples, groups, k), (k,))[metric]

    return evaluate


# ---------------------------------------------------------------------------
# Trained once per prepared data set: the cache
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FittedSasrec:
    """A trained SASRec with its catalogue and training record."""

    model: SASRec
    groups: TitleGroups
    record: TrainingRecord
    path: Path | None = None  # the cache file

    def ranked(self, examples: Sequence[Any], k: int) -> np.ndarray:
        return rank_sasrec(self.model, examples, self.groups, k)

    def summary(self) -> dict[str, Any]:
        """For summary.json: the kept epoch, its valid metric, the curve and the training CPU time."""
        r = self.record
        return {"best_epoch": r.best_epoch, "epochs": len(r.curve), f"valid {r.metric}": r.best_value,
                "valid_curve": r.curve, "train_loss": r.losses, "train_cpu_s": r.seconds,
                "cache": str(self.path) if self.path else ""}


def data_digest(data: Any) -> str:
    """A digest of what SASRec reads from a prepared data set: each user's training sequence, the
    valid split (it picks the epoch) and the titles (they make the title groups). The client column
    is left out: two partitions of the same users share one SASRec."""
    h = hashlib.sha256()
    seqs = data.train_sequences
    pairs = zip(seqs["user_id"], seqs["items"]) if hasattr(seqs, "columns") else enumerate(seqs)
    for user, items in sorted((int(u), [int(i) for i in s]) for u, s in pairs):
        h.update(json.dumps([user, items]).encode())
    for ex in sorted(data.split("valid"), key=lambda e: int(e.user_id)):
        h.update(json.dumps([int(ex.user_id), [int(i) for i in ex.history], int(ex.target)]).encode())
    h.update(json.dumps(sorted((int(k), str(v)) for k, v in data.titles.items())).encode())
    return h.hexdigest()


def cache_key(digest: str, s: SasrecSettings, seed: int) -> str:
    """A digest of everything the trained model depends on (`digest`: `data_digest` of the data)."""
    settings = {k: v for k, v in asdict(s).items() if k not in ("enabled", "seed")}
    text = json.dumps({"version": CACHE_VERSION, "data": digest, "settings": settings, "seed": int(seed)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_path(prepared_dir: str | Path, key: str) -> Path:
    return Path(prepared_dir) / CACHE_FOLDER / f"sasrec-{key}.safetensors"


def save_cached(path: Path, key: str, fitted: FittedSasrec) -> None:
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in fitted.model.state_dict().items()}
    metadata = {"key": key, "num_groups": str(fitted.groups.__len__()), "record": json.dumps(asdict(fitted.record))}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_cached(path: Path, key: str, groups: TitleGroups, s: SasrecSettings) -> FittedSasrec:
    """The cached model; SasrecError when the file is corrupt or belongs to other data or settings."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        if metadata.get("key") != key:
            raise SasrecError(f"it was written for key {metadata.get('key')!r}, not {key!r}")
        record = TrainingRecord(**json.loads(metadata["record"]))
        model = SASRec(len(groups), s)
        model.load_state_dict(tensors)
    except SasrecError:
        raise
    except Exception as err:  # noqa: BLE001 -- any failure to read it means: not a usable cache file
        raise SasrecError(f"it is not a readable SASRec cache file ({type(err).__name__}: {err})") from None
    model.eval()
    return FittedSasrec(model, groups, record, path)


def load_or_train(data: Any, s: SasrecSettings, seed: int | None = None,
                  groups: TitleGroups | None = None) -> FittedSasrec:
    """The SASRec of a prepared data set (`PreparedData`): from its cache, or trained and cached.
    `seed` None: ``sasrec.seed``.

    A cache file that cannot be used (corrupt, or another key inside) is replaced, with a log line.
    """
    groups = groups or TitleGroups.from_titles(data.titles)
    seed = s.seed if seed is None else seed
    key = cache_key(data_digest(data), s, seed)
    path = cache_path(data.path, key)
    if path.exists():
        try:
            fitted = load_cached(path, key, groups, s)
            log.info("SASRec: cached model %s (epoch %d kept, valid %s %.4f)", path, fitted.record.best_epoch,
                     fitted.record.metric, fitted.record.best_value)
            return fitted
        except SasrecError as err:
            log.warning("SASRec: the cache file %s is unusable (%s); training again and replacing it.", path, err)
    valid = data.split("valid")
    if not valid:
        raise SasrecError(f"the prepared data at {data.path} has no valid users: SASRec picks its epoch on them.")
    log.info("SASRec: training on %d users' sequences (%d title groups), selecting on %d valid users",
             len(data.train_sequences), len(groups), len(valid))
    model, record = train_sasrec(data.train_sequences, groups, s, seed, valid_metric(valid, groups, s.select_metric))
    fitted = FittedSasrec(model, groups, record, path)
    save_cached(path, key, fitted)
    log.info("SASRec: kept epoch %d of %d (valid %s %.4f), %.0f CPU-s; cached in %s", record.best_epoch,
             len(record.curve), record.metric, record.best_value, record.seconds, path)
    return fitted
