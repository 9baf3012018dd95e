"""Grounding: map generated text to real catalogue items (BIGRec).

A generated title is embedded with the BASE model (LoRA adapters off): the last decoder
layer's hidden state (after the final norm) at the text's last token, with no prompt
around it. Every catalogue title is embedded the same way once; the catalogue is public,
so the table is cached on disk. Items are ranked by L2 distance to the generated text.

Duplicate titles and history masking (the semantics every metric in this project uses):
several item ids can share one title string, and a generated title cannot tell them
apart (their embeddings are identical). So items are grouped by exact title string and
the *title groups* are ranked: a top-K list holds K distinct titles, each reported by the
smallest item id in its group. A user's target counts as hit at the position of its
title group, i.e. at the first position where any id with the target's title appears.
History masking removes the whole title group of every history item (the user already
has that title, whichever id it was); if the target shares its title with a history
item it is therefore unreachable and counts as a miss (the evaluation rows flag this).
Exact distance ties between different groups (only possible when two different titles
tokenise identically) are broken by the smaller item id.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from fellrec_flwr.progress import tqdm

from fellrec_flwr.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

EMBED_METHOD = "last-token-last-layer-v1"  # part of the cache key: change it if the method changes
EmbedFn = Callable[[Sequence[str]], np.ndarray]


class GroundingError(ValueError):
    """Bad input to grounding: unknown item ids, wrong embedding shapes, empty catalogue."""


# ---------------------------------------------------------------------------
# Title groups (pure)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class TitleGroups:
    """Item ids grouped by exact title string; groups ordered by their smallest id."""

    titles: tuple[str, ...]  # one unique title per group
    members: tuple[tuple[int, ...], ...]  # item ids per group, ascending
    rep_ids: np.ndarray  # (G,) smallest id of each group: the id a ranking reports
    group_of: np.ndarray  # (max_id + 1,) item id -> group index, -1 if not in the catalogue
    by_title: Mapping[str, int] = field(repr=False)

    @classmethod
    def from_titles(cls, titles: Mapping[int, str]) -> "TitleGroups":
        if not titles:
            raise GroundingError("the catalogue is empty: pass a non-empty item_id -> title mapping.")
        ids = sorted(int(i) for i in titles)
        if ids[0] < 0:
            raise GroundingError(f"item ids must be >= 0; got {ids[0]}.")
        by_title: dict[str, int] = {}
        members: list[list[int]] = []
        for item in ids:  # ascending ids, so groups come out ordered by their smallest id
            title = titles[item]
            if title not in by_title:
                by_title[title] = len(members)
                members.append([])
            members[by_title[title]].append(item)
        group_of = np.full(ids[-1] + 1, -1, dtype=np.int64)
        for g, group in enumerate(members):
            group_of[group] = g
        return cls(
            titles=tuple(by_title),
            members=tuple(tuple(m) for m in members),
            rep_ids=np.array([m[0] for m in members], dtype=np.int64),
            group_of=group_of,
            by_title=by_title,
        )

    def __len__(self) -> int:
        return len(self.titles)

    def __repr__(self) -> str:
        return f"TitleGroups({len(self)} titles over {int((self.group_of >= 0).sum())} item ids)"

    @property
    def canonical(self) -> np.ndarray:
        """item id -> smallest id with the same title (-1 for ids not in the catalogue).

        Pass it to `metrics.target_ranks(..., canonical=...)`."""
        return np.where(self.group_of >= 0, self.rep_ids[np.maximum(self.group_of, 0)], -1)

    def group_index(self, item_ids: Iterable[int]) -> np.ndarray:
        ids = np.asarray(list(item_ids), dtype=np.int64)
        bad = (ids < 0) | (ids >= len(self.group_of))
        groups = np.where(bad, -1, self.group_of[np.where(bad, 0, ids)])
        if (groups < 0).any():
            unknown = ids[groups < 0][:5].tolist()
            raise GroundingError(
                f"item ids {unknown} are not in the catalogue; build it from the same prepared data "
                "(items.parquet) the examples come from."
            )
        return groups

    def history_mask(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(users, G) bool: True for every title group holding one of the user's history items."""
        mask = np.zeros((len(histories), len(self)), dtype=bool)
        for row, history in enumerate(histories):
            if len(history):
                mask[row, self.group_index(history)] = True
        return mask


# ---------------------------------------------------------------------------
# Embedding with the base model
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def base_model_mode(model: Any) -> Iterator[None]:
    """Eval mode, no grad and, for a PeftModel, adapters disabled; restores the train flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _adapters_disabled(model):
            yield
    finally:
        model.train(was_training)


def _adapters_disabled(model: Any) -> contextlib.AbstractContextManager:
    try:
        from peft import PeftModel
    except ImportError:  # peft absent: nothing can be an adapter
        return contextlib.nullcontext()
    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()


def _decoder(model: Any) -> torch.nn.Module:
    """The transformer body (no LM head: the vocabulary projection is not needed here)."""
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model = model.get_base_model()
    except ImportError:
        pass
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text (the tokenizer's own special-token policy); an empty text becomes
    one BOS/EOS token so that it still has a last token to embed."""
    filler = next(t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, 0)
                  if t is not None)
    ids = tokenizer(list(texts))["input_ids"] if len(texts) else []
    return [list(seq) if len(seq) else [filler] for seq in ids]


def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 64,
                progress: bool = False, desc: str = "embedding") -> np.ndarray:
    """(len(texts), hidden) float32: base-model last-layer hidden state at each text's last token.

    Batches are right-padded and the last REAL token is gathered by length, so a text's
    embedding does not depend on what it is batched with (positions start at 0 for every
    text, and causal attention never sees the padding after it). Texts are processed
    shortest first to keep padding small.
    """
    if batch_size < 1:
        raise GroundingError(f"batch_size={batch_size} must be >= 1.")
    token_ids = tokenize_texts(tokenizer, texts)
    decoder = _decoder(model)
    hidden_size = int(getattr(decoder.config, "hidden_size", 0) or model.config.hidden_size)
    out = np.empty((len(token_ids), hidden_size), dtype=np.float32)
    if not token_ids:
        return out
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = np.array([len(t) for t in token_ids])
    order = np.argsort(lengths, kind="stable")
    device = _model_device(model)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with base_model_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            width = int(lengths[batch].max())
            input_ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                seq = token_ids[index]
                input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention[row, : len(seq)] = 1
            hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention.to(device)).last_hidden_state
            last = hidden[torch.arange(len(batch), device=hidden.device),
                          torch.as_tensor(lengths[batch] - 1, device=hidden.device)]
            out[batch] = last.float().cpu().numpy()
    return out


def model_fingerprint(model: Any) -> str:
    """A cheap hash of the base weights: class, config and a slice of every non-LoRA tensor."""
    digest = hashlib.sha256()
    base = _decoder(model)
    digest.update(type(base).__name__.encode())
    config = base.config.to_dict() if hasattr(base, "config") else {}
    for volatile in ("_name_or_path", "transformers_version", "name_or_path"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if "lora_" in name:
                continue
            flat = tensor.detach().reshape(-1)
            sample = torch.cat([flat[:512], flat[-512:]]).float().cpu().numpy()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Catalogue:
    """Title groups and one base-model embedding per group (row g = groups.titles[g])."""

    groups: TitleGroups
    embeddings: np.ndarray = field(repr=False)  # (G, hidden) float32
    key: str = ""  # the cache key it was built under ("" when made by hand)
    _sq_norms: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        emb = np.asarray(self.embeddings, dtype=np.float32)
        if emb.ndim != 2 or len(emb) != len(self.groups):
            raise GroundingError(
                f"embeddings must have one row per title group: expected ({len(self.groups)}, hidden), "
                f"got {emb.shape}."
            )
        object.__setattr__(self, "embeddings", emb)
        object.__setattr__(self, "_sq_norms", np.einsum("ij,ij->i", emb.astype(np.float64), emb.astype(np.float64)))

    @classmethod
    def build(cls, model: Any, tokenizer: Any, titles: Mapping[int, str], cache_dir: str | Path | None = None,
              model_id: str = "", batch_size: int = 64, embed_fn: EmbedFn | None = None,
              progress: bool = True) -> "Catalogue":
        """Embed every unique title with the base model (adapters off), or load it from the cache.

        The cache file is ``<cache_dir>/catalogue-<key>.npy`` where the key hashes
        `model_id`, a fingerprint of the base weights, the embedding method and the
        token ids of every unique title, so a stale table can never be reused.
        ``cache_dir=None`` keeps it in memory only. ``embed_fn(texts) -> (n, hidden)``
        replaces the local forward pass (e.g. to run it through the split service).
        """
        groups = TitleGroups.from_titles(titles)
        if model is None and (embed_fn is None or not model_id):
            raise GroundingError("Catalogue.build needs the base model, or an embed_fn together with a model_id "
                                 "that identifies the weights it embeds with (the cache key).")
        key = catalogue_key(model, tokenizer, groups.titles, model_id)
        path = Path(cache_dir) / f"catalogue-{key[:32]}.npy" if cache_dir is not None else None
        if path is not None and path.exists():
            try:
                table = np.load(path, allow_pickle=False)
                if table.ndim == 2 and len(table) == len(groups):
                    return cls(groups, table, key)
                log.warning("ignoring %s: shape %s does not match %d titles", path, table.shape, len(groups))
            except (OSError, ValueError) as err:  # a damaged file: recompute and overwrite it
                log.warning("ignoring unreadable catalogue cache %s: %s", path, err)
        if embed_fn is None:
            table = embed_texts(model, tokenizer, groups.titles, batch_size, progress, desc="catalogue")
        else:
            table = np.asarray(embed_fn(list(groups.titles)), dtype=np.float32)
        if path is not None:
            buffer = io.BytesIO()
            np.save(buffer, table.astype(np.float32), allow_pickle=False)
            atomic_write_bytes(path, buffer.getvalue())
        return cls(groups, table, key)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def canonical(self) -> np.ndarray:
        return self.groups.canonical

    def history_mask(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        return self.groups.history_mask(histories)

    def rank(self, query_embeddings: np.ndarray, histories: Sequence[Sequence[int]] | None = None,
             k: int = 20) -> np.ndarray:
        masks = None if histories is None else self.history_mask(histories)
        return rank(query_embeddings, self, masks, k)


def catalogue_key(model: Any, tokenizer: Any, unique_titles: Sequence[str], model_id: str = "") -> str:
    digest = hashlib.sha256()
    digest.update(EMBED_METHOD.encode())
    digest.update(model_id.encode())
    if model is not None:  # None: an embed_fn does the work and model_id must say what it embeds with
        digest.update(model_fingerprint(model).encode())
    for title, ids in zip(unique_titles, tokenize_texts(tokenizer, unique_titles)):
        digest.update(title.encode())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Ranking (pure numpy)
# ---------------------------------------------------------------------------


def rank_groups(query_embeddings: np.ndarray, catalogue: Catalogue, history_masks: np.ndarray | None,
                k: int, chunk: int = 512) -> np.ndarray:
    """(users, k) title-group indices by ascending L2 distance, masked groups skipped, -1 padding.

    Distances use ||q||^2 - 2 q.c + ||c||^2 in float64 (so an exact title is at distance
    ~0, far below any other title). Ties are broken by the smaller group index.
    """
    if k < 1:
        raise GroundingError(f"k={k} must be >= 1.")
    queries = np.asarray(query_embeddings, dtype=np.float64)
    table = catalogue.embeddings.astype(np.float64)
    if queries.ndim != 2 or queries.shape[1] != table.shape[1]:
        raise GroundingError(
            f"query embeddings must be (users, {table.shape[1]}) to match the catalogue; got {queries.shape}. "
            "Embed queries with the same base model as the catalogue."
        )
    if history_masks is not None and np.shape(history_masks) != (len(queries), len(catalogue)):
        raise GroundingError(
            f"history masks must be (users, groups) = ({len(queries)}, {len(catalogue)}); "
            f"got {np.shape(history_masks)}. Build them with Catalogue.history_mask."
        )
    num_groups = len(catalogue)
    take = min(k, num_groups)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        dist = (q * q).sum(axis=1, keepdims=True) - 2.0 * (q @ table.T) + catalogue._sq_norms[None, :]
        if history_masks is not None:
            dist[np.asarray(history_masks[start:start + chunk], dtype=bool)] = np.inf
        part = np.argpartition(dist, take - 1, axis=1)[:, :take]
        part_dist = np.take_along_axis(dist, part, axis=1)
        # Sort the k candidates by (distance, group index).
        order = np.lexsort((part, part_dist), axis=1)
        top = np.take_along_axis(part, order, axis=1)
        top_dist = np.take_along_axis(part_dist, order, axis=1)
        # argpartition picks arbitrarily among ties AT the k-th distance; redo those rows exactly.
        kth = top_dist[:, -1:]
        boundary_ties = (dist <= kth).sum(axis=1) > take
        for row in np.flatnonzero(boundary_ties & np.isfinite(kth[:, 0])):
            full = np.lexsort((np.arange(num_groups), dist[row]))[:take]
            top[row], top_dist[row] = full, dist[row, full]
        top[~np.isfinite(top_dist)] = -1  # fewer unmasked groups than k
        out[start:start + len(q), :take] = top
    return out


def rank(query_embeddings: np.ndarray, catalogue: Catalogue, history_masks: np.ndarray | None,
         k: int) -> np.ndarray:
    """(users, k) item ids, nearest title first; each title group is reported by its smallest id.

    Score with `metrics.target_ranks(ranked, targets, canonical=catalogue.canonical)`.
    """
    groups = rank_groups(query_embeddings, catalogue, history_masks, k)
    return np.where(groups >= 0, catalogue.groups.rep_ids[np.maximum(groups, 0)], -1)
