"""Catalogue-constrained decoding: rank catalogue titles by the model's likelihood of writing them.

Instead of generating free text and grounding it (BIGRec's beam search + L2, see
`fellrec_flwr.eval.evaluate`), the model may only write a catalogue title: a beam search walks a
prefix tree (trie) of every title's response tokens -- exactly the tokens a training sequence
holds after the prompt, ``'"Title"'`` (`prompts.format_response`) plus EOS -- and returns the
top-K distinct titles with their scores

    score(title) = sum_t log p(token_t | prompt, tokens_<t)        (optionally / n_tokens**length_norm)

Title groups (several item ids with one title string, `grounding.TitleGroups`) are the
unit, as everywhere in evaluation: each group ends at one trie node; a user's history groups
are masked (never returned, and subtrees holding only masked titles are never expanded).

Speed (the reason this is not `generate(prefix_allowed_tokens_fn=...)`): each prompt is
encoded once and its KV cache held once, shared by the user's live beams (a beam's cache row
holds only its title tokens; `_share_prompt`); users are batched; a beam is a trie node, and
every beam's children come from flat child arrays in a few numpy operations; a beam is
dropped as soon as it cannot beat the K-th finished title (log-probs are <= 0, so a prefix's
score bounds every completion's), and a user is done when no beam is left.

Title prior (optional): a few famous titles are likely under any prompt. `TitlePrior` scores
titles under a neutral prompt (the prompt of an empty history) and `rerank_with_prior`
subtracts ``weight x prior`` from the search's candidates (the top K by raw score plus up
to `beams` further titles the search finished) before taking the top K.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from fellrec_flwr.progress import tqdm

from fellrec_flwr.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

PRIOR_METHOD = "neutral-prompt-loglik-v1"  # part of the prior cache key


class ConstrainedError(ValueError):
    """Bad input to constrained decoding (empty catalogue, bad K/beams, tokenizer without EOS)."""


# ---------------------------------------------------------------------------
# The trie (pure python/numpy)
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class TitleTrie:
    """Prefix tree of token sequences; node 0 is the root. Sequence g ends at node `end_node[g]`."""

    children: list[dict[int, int]]  # node -> {token: child node}
    token: np.ndarray  # node -> the token on the edge into it (-1 for the root)
    depth: np.ndarray  # node -> tokens from the root
    parent: np.ndarray  # node -> parent node (-1 for the root)
    terminal: list[tuple[int, ...]]  # node -> sequences (title groups) ending exactly here
    subtree: np.ndarray  # node -> number of sequences ending at or below it
    max_depth: np.ndarray  # node -> depth of the deepest sequence end at or below it
    end_node: np.ndarray  # sequence -> its last node
    sequences: list[list[int]] = field(repr=False)
    _child_arrays: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    _csr: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]]) -> "TitleTrie":
        if not sequences:
            raise ConstrainedError("the catalogue is empty: no title sequences to build a trie from.")
        children: list[dict[int, int]] = [{}]
        token, depth, parent = [-1], [0], [-1]
        terminal: list[list[int]] = [[]]
        end_node = np.empty(len(sequences), dtype=np.int64)
        for g, seq in enumerate(sequences):
            if not len(seq):
                raise ConstrainedError(f"title sequence {g} is empty; every title needs at least one token.")
            node = 0
            for tok in seq:
                nxt = children[node].get(int(tok))
                if nxt is None:
                    nxt = len(children)
                    children[node][int(tok)] = nxt
                    children.append({})
                    token.append(int(tok))
                    depth.append(depth[node] + 1)
                    parent.append(node)
                    terminal.append([])
                node = nxt
            terminal[node].append(g)
            end_node[g] = node
        n = len(children)
        depth_arr = np.asarray(depth, dtype=np.int64)
        parent_arr = np.asarray(parent, dtype=np.int64)
        subtree = np.array([len(t) for t in terminal], dtype=np.int64)
        max_depth = np.where(subtree > 0, depth_arr, 0)
        for node in range(n - 1, 0, -1):  # children always have larger ids than their parent
            p = parent_arr[node]
            subtree[p] += subtree[node]
            max_depth[p] = max(max_depth[p], max_depth[node])
        return cls(children=children, token=np.asarray(token, dtype=np.int64), depth=depth_arr,
                   parent=parent_arr, terminal=[tuple(t) for t in terminal], subtree=subtree,
                   max_depth=max_depth, end_node=end_node, sequences=[list(map(int, s)) for s in sequences])

    def __len__(self) -> int:
        return len(self.children)

    @property
    def num_sequences(self) -> int:
        return len(self.end_node)

    def child_arrays(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, child nodes) of `node` as arrays (cached: the wide upper nodes are hit by every user)."""
        out = self._child_arrays.get(node)
        if out is None:
            kids = self.children[node]
            out = (np.fromiter(kids.keys(), dtype=np.int64, count=len(kids)),
                   np.fromiter(kids.values(), dtype=np.int64, count=len(kids)))
            self._child_arrays[node] = out
        return out

    def child_csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(start, token, child, n_terminal): node v's children are child[start[v]:start[v+1]] with
        edge tokens token[...] (in `children[v]`'s order); n_terminal[v] = sequences ending at v.

        Flat arrays, so a step expands every beam's children with a few numpy ops (built once).
        """
        if self._csr is None:
            kids = np.arange(1, len(self), dtype=np.int64)
            # Stable by parent: a node's children in creation order, which is its dict's order.
            kids = kids[np.argsort(self.parent[1:], kind="stable")]
            start = np.zeros(len(self) + 1, dtype=np.int64)
            np.cumsum(np.bincount(self.parent[1:], minlength=len(self)), out=start[1:])
            n_terminal = np.fromiter((len(t) for t in self.terminal), dtype=np.int64, count=len(self))
            self._csr = (start, self.token[kids], kids, n_terminal)
        return self._csr

    def masked_counts(self, groups: Sequence[int]) -> dict[int, int]:
        """node -> how many of `groups` end at or below it (for one user's history mask)."""
        counts: dict[int, int] = {}
        for g in set(int(x) for x in groups):
            node = int(self.end_node[g])
            while node >= 0:
                counts[node] = counts.get(node, 0) + 1
                node = int(self.parent[node])
        return counts


def response_sequences(tokenizer: Any, titles: Sequence[str], end_with_eos: bool = True,
                       format_fn: Callable[[str], str] | None = None) -> list[list[int]]:
    """Token ids of each title as the model writes it after the prompt: '"Title"' (+ EOS).

    Tokenised on its own, without special tokens, exactly like a training sequence's
    response (`collate.response_token_ids`), so the search scores what training taught.
    """
    if format_fn is None:
        from fellrec_flwr.data.prompts import format_response as format_fn
    eos = tokenizer.eos_token_id
    if end_with_eos and eos is None:
        raise ConstrainedError("the tokenizer has no EOS token; set tokenizer.eos_token or use end_with_eos=False.")
    texts = [format_fn(t) for t in titles]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(seq) + ([int(eos)] if end_with_eos else []) for seq in ids]


def build_title_trie(tokenizer: Any, titles: Sequence[str], end_with_eos: bool = True) -> TitleTrie:
    """Trie over `titles` (one per title group, in group order) as the model writes them."""
    return TitleTrie.from_sequences(response_sequences(tokenizer, titles, end_with_eos))


# ---------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _inference(model: Any) -> Iterator[None]:
    """Eval mode and no grad (adapters stay ON: the tuned model is being evaluated)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: Any, last_only: bool) -> tuple[torch.Tensor, Any]:
    """float32 log-probs (rows, positions, vocab) and the updated KV cache."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=True, logits_to_keep=1 if last_only else 0)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return torch.log_softmax(out.logits.float(), dim=-1), new_cache


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[row, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _pad_id(tokenizer_or_id: Any) -> int:
    if isinstance(tokenizer_or_id, int):
        return tokenizer_or_id
    for tid in (tokenizer_or_id.pad_token_id, tokenizer_or_id.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _share_prompt(cache: Any) -> bool:
    """Turn a prompt-only DynamicCache (one row per prompt) into `_SharedPromptLayer`s, in place.

    The object stays the same (a split model keys its server session on it and wraps its
    `reorder_cache`); False, and nothing changed, for a cache of another kind.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    shared = _shared_prompt_layer_class()
    # Layers the prompt did not fill (a split model's server-side layers) stay as they are.
    cache.layers[:] = [shared(layer) if layer.is_initialized else layer for layer in layers]
    return any(layer.is_initialized for layer in layers)


@functools.cache
def _shared_prompt_layer_class() -> type:
    # Defined on first use: transformers is imported only when a search runs.
    from transformers.cache_utils import DynamicLayer

    class SharedPromptLayer(DynamicLayer):
        """One layer's KV cache with each prompt's keys/values held ONCE, not once per beam.

        Before, every beam's cache row held a copy of its prompt (~231 tokens on Games) and
        every step copied all rows twice (the cache's append and the beam reorder): most of
        the search's memory and a third of its time. Here a row holds only its title tokens
        (`keys`/`values`) and `row_prompt` says whose prompt precedes them; `update` assembles
        the full [rows, heads, prompt + title, dim] keys for this layer's attention only (one
        copy; freed before the next layer), bit for bit the tensor the plain cache held.
        """

        def __init__(self, layer: Any):
            super().__init__()
            self.prompt_keys, self.prompt_values = layer.keys, layer.values
            self.keys, self.values = layer.keys[:, :, :0].contiguous(), layer.values[:, :, :0].contiguous()
            self.device, self.is_initialized = layer.keys.device, True
            self._set_rows(np.arange(len(layer.keys)))

        def _set_rows(self, row_prompt: np.ndarray) -> None:
            self.row_prompt = row_prompt
            # Rows are grouped by prompt: (prompt, first row, end row) per run, copied with one broadcast each.
            cuts = np.flatnonzero(np.diff(row_prompt)) + 1
            self.runs = [(int(row_prompt[lo]), int(lo), int(hi))
                         for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(row_prompt)])]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            return self._full(self.prompt_keys, self.keys), self._full(self.prompt_values, self.values)

        def _full(self, prompt: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
            p = prompt.shape[-2]
            out = own.new_empty((own.shape[0], own.shape[1], p + own.shape[-2], own.shape[-1]))
            for u, lo, hi in self.runs:
                out[lo:hi, :, :p].copy_(prompt[u:u + 1].expand(hi - lo, -1, -1, -1))
            out[:, :, p:].copy_(own)
            return out

        def get_seq_length(self) -> int:
            return self.prompt_keys.shape[-2] + self.keys.shape[-2]

        _host_index: tuple[Any, np.ndarray] = (None, np.zeros(0, dtype=np.int64))

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))
            self._set_rows(self.row_prompt[self._on_host(beam_idx)])

        @classmethod
        def _on_host(cls, beam_idx: torch.LongTensor) -> np.ndarray:
            """The index on the host, copied once per step: every layer gets the same tensor, and on a GPU
            each copy waits for the device (one sync per layer per step before)."""
            if cls._host_index[0] is not beam_idx:
                cls._host_index = (beam_idx, beam_idx.cpu().numpy())
            return cls._host_index[1]

        def _unsupported(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("the constrained search's cache supports update and reorder_cache only.")

        crop = batch_repeat_interleave = batch_select_indices = offload = _unsupported

    return SharedPromptLayer




# ---------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------


@dataclass
class _UserState:
    masked: dict[int, int]  # trie node -> masked groups at or below it
    masked_groups: frozenset[int]
    finished: list[tuple[float, int]] = field(default_factory=list)  # (score, group), best first
    _masked_nodes: np.ndarray | None = None
    _masked_counts: np.ndarray | None = None

    def masked_below(self, nodes: np.ndarray) -> np.ndarray:
        """How many masked groups end at or below each node (sorted look-up, no per-node Python)."""
        if not self.masked:
            return np.zeros(len(nodes), dtype=np.int64)
        if self._masked_nodes is None:
            keys = np.fromiter(self.masked.keys(), dtype=np.int64, count=len(self.masked))
            order = np.argsort(keys)
            vals = np.fromiter(self.masked.values(), dtype=np.int64, count=len(self.masked))
            self._masked_nodes, self._masked_counts = keys[order], vals[order]
        at = np.minimum(np.searchsorted(self._masked_nodes, nodes), len(self._masked_nodes) - 1)
        return np.where(self._masked_nodes[at] == nodes, self._masked_counts[at], 0)

    def kth(self, k: int) -> float:
        return self.finished[k - 1][0] if len(self.finished) >= k else -np.inf

    def add(self, items: list[tuple[float, int]], keep: int) -> None:
        if items:
            self.finished.extend(items)
            self.finished.sort(key=lambda sg: (-sg[0], sg[1]))
            del self.finished[keep:]  # later titles only push these down: beyond `keep` never returns


def constrained_search(model: Any, prompts: Sequence[Sequence[int]], trie: TitleTrie, k: int, beams: int,
                       masked_groups: Sequence[Sequence[int]] | None = None, *, length_norm: float = 0.0,
                       batch_users: int = 4, max_rows: int = 128, pad_token_id: int = 0, extra: int = 0,
                       max_widen: int = 2, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` distinct title groups per prompt by (length-normalised) log-likelihood.

    prompts: token ids per user (BOS included where the model expects it), each ending
    where the response starts. masked_groups: per user, groups never to return (history).
    beams: live prefixes kept per user and step; finished titles do not take a slot, and
    with beams >= the number of titles the result is the exact top-k. A user whose beams
    all end before k titles are found is searched again with twice the beams, at most
    `max_widen` times (then fewer than k titles come back; rare with beams >= k).
    extra: also return up to this many further titles the search finished on the way
    (free: pruning still only protects the top k), e.g. as candidates for a re-ranking.
    Returns (groups, scores), both (users, k + extra), best first; -1 / -inf where fewer
    titles were found. Ties go to the smaller group index.
    """
    if k < 1 or beams < 1:
        raise ConstrainedError(f"k={k} and beams={beams} must both be >= 1.")
    if length_norm < 0:
        raise ConstrainedError(f"length_norm={length_norm} must be >= 0 (0 = plain sum of log-probs).")
    if masked_groups is not None and len(masked_groups) != len(prompts):
        raise ConstrainedError(f"masked_groups has {len(masked_groups)} rows for {len(prompts)} prompts.")
    if any(len(p) == 0 for p in prompts):
        raise ConstrainedError("a prompt is empty; every prompt needs at least one token (e.g. BOS).")
    if extra < 0 or max_widen < 0:
        raise ConstrainedError(f"extra={extra} and max_widen={max_widen} must be >= 0.")
    groups_out = np.full((len(prompts), k + extra), -1, dtype=np.int64)
    scores_out = np.full((len(prompts), k + extra), -np.inf, dtype=np.float64)
    per_batch = max(1, min(batch_users, max_rows // beams if beams <= max_rows else 1))
    # Longest prompts first (the slow batches show up early in the progress bar), similar lengths together.
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
    with _inference(model):
        for batch in tqdm(batches, desc="constrained", disable=not progress, unit="batch"):
            masks = [masked_groups[i] if masked_groups is not None else () for i in batch]
            found = _search_batch(model, [prompts[i] for i in batch], trie, k, beams, masks, length_norm,
                                  pad_token_id, extra)
            found = _widen_short(model, [prompts[i] for i in batch], trie, k, beams, masks, length_norm,
                                 pad_token_id, extra, found, max_widen, max_rows)
            for row, user in enumerate(batch):
                for j, (score, group) in enumerate(found[row]):
                    groups_out[user, j], scores_out[user, j] = group, score
    return groups_out, scores_out


def _widen_short(model: Any, prompts: list[Sequence[int]], trie: TitleTrie, k: int, beams: int,
                 masks: list[Sequence[int]], length_norm: float, pad_id: int, extra: int,
                 found: list[list[tuple[float, int]]], max_widen: int, max_rows: int) -> list[list[tuple[float, int]]]:
    """Search again, with twice the beams, for users whose beams all died before k titles finished.

    Beams pruned early are gone, so a narrow search can run out of titles (e.g. when every
    title has the same length); doubling finds more (once beams >= the number of titles
    the search is exhaustive). Users are searched again in groups of at most `max_rows` beams.
    """
    width = beams
    for _ in range(max_widen):
        short = [i for i, f in enumerate(found)
                 if len(f) < min(k, trie.num_sequences - len(set(int(g) for g in masks[i])))]
        if not short or width >= trie.num_sequences:
            break
        width = min(2 * width, trie.num_sequences)
        per = max(1, max_rows // width)
        for start in range(0, len(short), per):
            part = short[start:start + per]
            again = _search_batch(model, [prompts[i] for i in part], trie, k, width, [masks[i] for i in part],
                                  length_norm, pad_id, extra)
            for i, f in zip(part, again):
                found[i] = f
    return found


def _search_batch(model: Any, prompts: list[Sequence[int]], trie: TitleTrie, k: int, beams: int,
                  masked_groups: list[Sequence[int]], length_norm: float, pad_id: int,
                  extra: int = 0) -> list[list[tuple[float, int]]]:
    device = _device(model)
    start, child_tok, child_node, n_terminal = trie.child_csr()
    users = [_UserState(trie.masked_counts(m), frozenset(int(g) for g in m)) for m in masked_groups]
    ids, mask, positions = _left_pad(prompts, pad_id, device)
    logp, cache = _forward(model, ids, mask, positions, None, last_only=True)
    _share_prompt(cache)  # the prompt's KV once per user, not once per beam (exactly the same attention)
    prompt_len = torch.as_tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    # Live beams, one entry per cache row, grouped by user in user order: owning user, trie node, score.
    beam_user = np.arange(len(prompts))
    beam_node = np.zeros(len(prompts), dtype=np.int64)
    beam_score = np.zeros(len(prompts), dtype=np.float64)
    while len(beam_user):
        # Every beam's trie children at once (flat child arrays): candidate -> (cache row, token, node).
        counts = start[beam_node + 1] - start[beam_node]
        cand_row = np.repeat(np.arange(len(beam_node)), counts)
        flat = np.repeat(start[beam_node] - (np.cumsum(counts) - counts), counts) + np.arange(cand_row.size)
        cand_tok, cand_node = child_tok[flat], child_node[flat]
        step = logp[:, -1, :][torch.as_tensor(cand_row, device=logp.device),
                              torch.as_tensor(cand_tok, device=logp.device)]
        cand_score = beam_score[cand_row] + step.double().cpu().numpy()
        cand_user = beam_user[cand_row]  # non-decreasing: beams are grouped by user
        edges = np.searchsorted(cand_user, np.arange(len(users) + 1))
        keep = []
        for u in np.flatnonzero(edges[1:] > edges[:-1]):
            lo = edges[u]
            keep.append(lo + _expand_user(users[u], trie, cand_node[lo:edges[u + 1]], cand_score[lo:edges[u + 1]],
                                          k, beams, length_norm, extra, n_terminal))
        picked = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
        if not len(picked):
            break
        parent_rows = cand_row[picked]
        beam_node, beam_score, beam_user = cand_node[picked], cand_score[picked], cand_user[picked]
        index = torch.as_tensor(parent_rows, dtype=torch.long, device=device)
        cache.reorder_cache(index)  # row i of the cache now holds the prefix of new beam i
        mask = torch.cat([mask.index_select(0, index), torch.ones((len(index), 1), dtype=mask.dtype, device=device)], 1)
        depth = torch.as_tensor(trie.depth[beam_node], dtype=torch.long, device=device)
        pos = (prompt_len[torch.as_tensor(beam_user, device=device)] + depth - 1).unsqueeze(1)
        tok = torch.as_tensor(trie.token[beam_node], dtype=torch.long, device=device).unsqueeze(1)
        del logp  # the last step's log-probs are read; free them before the next forward
        logp, cache = _forward(model, tok, mask, pos, cache, last_only=True)
    return [u.finished for u in users]


def _expand_user(user: _UserState, trie: TitleTrie, nodes: np.ndarray, scores: np.ndarray, k: int, beams: int,
                 length_norm: float, extra: int = 0, n_terminal: np.ndarray | None = None) -> np.ndarray:
    """Record the user's finished titles among the candidate nodes; return the candidates kept as beams."""
    if n_terminal is None:
        n_terminal = trie.child_csr()[3]
    alive = trie.subtree[nodes] - user.masked_below(nodes)  # unmasked titles at or below each candidate
    done: list[tuple[float, int]] = []
    ends_here = np.zeros(len(nodes), dtype=np.int64)
    # Only candidates where a title ends (a few per step) need the per-title look-ups.
    for i in np.flatnonzero((alive > 0) & (n_terminal[nodes] > 0)):
        ends = [g for g in trie.terminal[int(nodes[i])] if g not in user.masked_groups]
        if ends:
            ends_here[i] = len(ends)
            final = _normalise(scores[i], int(trie.depth[nodes[i]]), length_norm)
            done.extend((final, g) for g in ends)
    user.add(done, k + extra)
    # A beam continues only if an unmasked title lies strictly below it and it can still beat the K-th.
    below = alive - ends_here
    bound = scores if length_norm == 0 else scores / np.maximum(trie.max_depth[nodes], 1) ** length_norm
    live = np.flatnonzero((below > 0) & (bound >= user.kth(k)))
    if len(live) > beams:
        # Highest scores; ties by node id so the result does not depend on candidate order.
        order = np.lexsort((nodes[live], -scores[live]))
        live = live[order[:beams]]
    return live


def _normalise(score: float, length: int, length_norm: float) -> float:
    return float(score) if length_norm == 0 else float(score) / max(length, 1) ** length_norm


# ---------------------------------------------------------------------------
# Scoring given titles (brute force; the prior)
# ---------------------------------------------------------------------------


def sequence_log_likelihoods(model: Any, prompt: Sequence[int], sequences: Sequence[Sequence[int]],
                             batch_size: int = 32, pad_token_id: int = 0, progress: bool = False,
                             length_norm: float = 0.0) -> np.ndarray:
    """log p(sequence | prompt) for every sequence (teacher forcing, the prompt encoded once).

    The direct computation the trie search must agree with, and the title prior's scorer.
    """
    if not len(prompt):
        raise ConstrainedError("the prompt is empty; it needs at least one token (e.g. BOS).")
    out = np.empty(len(sequences), dtype=np.float64)
    if not len(sequences):
        return out
    device = _device(model)
    order = np.argsort([len(s) for s in sequences], kind="stable")
    p = len(prompt)
    with _inference(model):
        ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=device)
        first, prompt_cache = _forward(model, ids, torch.ones_like(ids), torch.arange(p, device=device)[None],
                                       None, last_only=True)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="title likelihoods", disable=not progress, unit="batch"):
            seqs = [sequences[i] for i in batch]
            width = max(len(s) for s in seqs)
            tok = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
            real = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):
                tok[row, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
                real[row, :len(s)] = 1
            tok, real = tok.to(device), real.to(device)
            cache = copy.deepcopy(prompt_cache)
            _share_prompt(cache)  # the prompt's KV once for the batch, not once per sequence
            cache.reorder_cache(torch.zeros(len(seqs), dtype=torch.long, device=device))
            mask = torch.cat([torch.ones((len(seqs), p), dtype=torch.long, device=device), real], 1)
            pos = (p + torch.arange(width, device=device)).expand(len(seqs), width)
            logp, _ = _forward(model, tok, mask, pos, cache, last_only=False)
            # token 0 is predicted by the prompt's last position, token t by the sequence's position t-1
            step = torch.cat([first[0, -1][tok[:, :1]], logp[:, :-1].gather(2, tok[:, 1:, None])[..., 0]], 1)
            total = (step.double() * real).sum(1).cpu().numpy()
            lengths = real.sum(1).cpu().numpy()
            out[batch] = [_normalise(s, int(n), length_norm) for s, n in zip(total, lengths)]
    return out


class TitlePrior:
    """Each title's log-likelihood under a neutral prompt, computed on first use and cached.

    Only the titles a search proposes are ever scored (a few thousand of ~17k on Games); with
    `cache_file` the values persist across runs, under a key of the model fingerprint, the
    prompt and every title's tokens (so a stale file is never reused).
    """

    def __init__(self, model: Any, prompt: Sequence[int], trie: TitleTrie, *, length_norm: float = 0.0,
                 batch_size: int = 32, pad_token_id: int = 0, cache_file: str | Path | None = None,
                 model_key: str = ""):
        self.model, self.prompt, self.trie = model, list(prompt), trie
        self.length_norm, self.batch_size, self.pad_token_id = length_norm, batch_size, pad_token_id
        self.values: dict[int, float] = {}
        self.cache_file = Path(cache_file) if cache_file is not None else None
        digest = hashlib.sha256(json.dumps([PRIOR_METHOD, model_key, self.prompt, length_norm]).encode())
        for seq in trie.sequences:
            digest.update(np.asarray(seq, dtype=np.int64).tobytes())
        self.key = digest.hexdigest()
        self._load()

    def _load(self) -> None:
        if self.cache_file is None or not self.cache_file.exists():
            return
        try:
            stored = json.loads(self.cache_file.read_text())
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable prior cache %s: %s", self.cache_file, err)
            return
        if stored.get("key") == self.key:
            self.values = {int(g): float(v) for g, v in stored["values"].items()}

    def _save(self) -> None:
        if self.cache_file is not None:
            blob = json.dumps({"key": self.key, "values": {str(g): v for g, v in self.values.items()}})
            atomic_write_bytes(self.cache_file, blob.encode())

    def __call__(self, groups: np.ndarray) -> np.ndarray:
        """Prior log-likelihood of each group in `groups` (any shape; -1 entries give 0)."""
        groups = np.asarray(groups, dtype=np.int64)
        missing = sorted({int(g) for g in groups.ravel() if g >= 0 and int(g) not in self.values})
        if missing:
            values = sequence_log_likelihoods(self.model, self.prompt, [self.trie.sequences[g] for g in missing],
                                              self.batch_size, self.pad_token_id, length_norm=self.length_norm)
            self.values.update(zip(missing, values.tolist()))
            self._save()
        flat = [self.values.get(int(g), 0.0) if g >= 0 else 0.0 for g in groups.ravel()]
        return np.asarray(flat, dtype=np.float64).reshape(groups.shape)


def rerank_with_prior(groups: np.ndarray, scores: np.ndarray, prior: np.ndarray, weight: float,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row by score - weight * prior (ties: smaller group index; -1 padding stays last)."""
    corrected = np.where(groups >= 0, scores - weight * prior, -np.inf)
    out_g = np.full((len(groups), k), -1, dtype=np.int64)
    out_s = np.full((len(groups), k), -np.inf, dtype=np.float64)
    for row in range(len(groups)):
        valid = np.flatnonzero(groups[row] >= 0)
        order = valid[np.lexsort((groups[row, valid], -corrected[row, valid]))][:k]
        out_g[row, :len(order)], out_s[row, :len(order)] = groups[row, order], corrected[row, order]
    return out_g, out_s


# ---------------------------------------------------------------------------
# Ranking a catalogue for users
# ---------------------------------------------------------------------------


@dataclass
class ConstrainedRanker:
    """Everything a constrained evaluation needs, built once per (model, tokenizer, catalogue)."""

    model: Any
    tokenizer: Any
    trie: TitleTrie
    beams: int = 20
    prior_weight: float = 0.0
    length_norm: float = 0.0
    batch_users: int = 4
    prior: TitlePrior | None = None

    @classmethod
    def build(cls, model: Any, tokenizer: Any, unique_titles: Sequence[str], neutral_prompt: Sequence[int] | None = None,
              *, beams: int = 20, prior_weight: float = 0.0, length_norm: float = 0.0, batch_users: int = 4,
              end_with_eos: bool = True, prior_cache_file: str | Path | None = None,
              model_key: str = "") -> "ConstrainedRanker":
        if beams < 1:
            raise ConstrainedError(f"beams={beams} must be >= 1 (eval.constrained-beams).")
        trie = build_title_trie(tokenizer, unique_titles, end_with_eos)
        prior = None
        if prior_weight != 0.0:
            if neutral_prompt is None:
                raise ConstrainedError("prior_weight != 0 needs the neutral prompt's token ids.")
            prior = TitlePrior(model, neutral_prompt, trie, length_norm=length_norm, pad_token_id=_pad_id(tokenizer),
                               cache_file=prior_cache_file, model_key=model_key)
        return cls(model, tokenizer, trie, beams, prior_weight, length_norm, batch_users, prior)

    def rank(self, prompts: Sequence[Sequence[int]], masked_groups: Sequence[Sequence[int]] | None, k: int,
             progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(users, k) title-group indices and their final scores, best first."""
        # The prior re-ranks a wider pool: the top k plus titles the search finished on the way.
        extra = 0 if self.prior is None else self.beams
        groups, scores = constrained_search(self.model, prompts, self.trie, k, self.beams, masked_groups,
                                            length_norm=self.length_norm, batch_users=self.batch_users,
                                            pad_token_id=_pad_id(self.tokenizer), extra=extra, progress=progress)
        if self.prior is None:
            return groups, scores
        return rerank_with_prior(groups, scores, self.prior(groups), self.prior_weight, k)

