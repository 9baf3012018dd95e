"""The audit: train the inverter on the attacker's prompts, score it on real users, per cut.

Rows of the result (one per cut, direction and kind of observation):

- ``front`` / ``activation``: what the client sends at the front cut (k = 0 is the
  embedding output, the sanity row: recovery there should be near perfect).
- ``back`` / ``activation``: what the server itself sends back at the back cut.
- ``back`` / ``gradient``: what the client sends back in training, d loss / d back-cut input.

All three are observed on *training* sequences (prompt + '"target"' + EOS), so every row
also says how much of the target can be read (``target_*``). Metrics on the real users:
``token_acc`` (history-title positions), ``target_token_acc``, ``history_item_recall``
(per user, the share of history items whose recovered span grounds to them, averaged over
users) and ``target_item_recall`` (share of users whose target is identified).

Optional rows (``noise_sigma > 0``): the Gaussian-noise defence at one front cut, with its
price ``lm_loss`` (the model's loss on the real sequences when the noise is applied).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from fellrec_flwr.progress import tqdm

from fellrec_flwr.audit.defence import NoiseAt, add_relative_noise, mean_loss
from fellrec_flwr.audit.identify import TitleMatcher
from fellrec_flwr.audit.inverter import ALPHAS, fit_inverter, window_features
from fellrec_flwr.audit.observe import Observations, Observed, observe
from fellrec_flwr.audit.sequences import AuditError, AuditSequence, encode_sequence, synthetic_histories
from fellrec_flwr.data.prompts import format_response
from fellrec_flwr.seeding import derive_seed

COLUMNS = ["k", "direction", "observed", "hidden_index", "noise_sigma", "token_acc", "target_token_acc",
           "history_item_recall", "target_item_recall", "n_eval", "n_history_items", "n_train_prompts",
           "ridge_alpha", "lm_loss"]


@dataclass(frozen=True)
class AuditSettings:
    front_cuts: tuple[int, ...] = (0, 1, 2)
    back_cuts: tuple[int, ...] = (1, 2)
    directions: tuple[str, ...] = ("front", "back")
    train_prompts: int = 200  # attacker's synthetic prompts
    history_len: int = 10
    max_length: int = 256
    batch_size: int = 8
    train_on_inputs: bool = True  # the client's loss (decides which gradients exist)
    window: int = 1  # inverter features: positions t-window..t+window
    alphas: tuple[float, ...] = ALPHAS
    seed: int = 0
    noise_cut: int = 1  # front cut of the noise-defence sweep
    noise_sigmas: tuple[float, ...] = ()  # empty = no defence sweep
    noise_loss_users: int = 32  # the price (model loss under noise) is measured on this many real users

    def validate(self, num_layers: int) -> "AuditSettings":
        unknown = set(self.directions) - {"front", "back"}
        if unknown or not self.directions:
            raise AuditError(f"directions {sorted(unknown) or '(none)'} are not 'front' or 'back'; "
                             "pass e.g. --direction front,back.")
        if "front" in self.directions:
            bad = [k for k in self.front_cuts if not 0 <= k < num_layers]
            if bad or not self.front_cuts:
                raise AuditError(f"front cuts {bad or '(none)'} must lie in 0..{num_layers - 1} "
                                 f"for this {num_layers}-layer model (k = layers kept by the client).")
        if "back" in self.directions:
            bad = [k for k in self.back_cuts if not 1 <= k <= num_layers]
            if bad or not self.back_cuts:
                raise AuditError(f"back cuts {bad or '(none)'} must lie in 1..{num_layers} "
                                 f"for this {num_layers}-layer model.")
        if self.noise_sigmas and not 0 <= self.noise_cut < num_layers:
            raise AuditError(f"noise_cut={self.noise_cut} must lie in 0..{num_layers - 1}.")
        if any(s < 0 for s in self.noise_sigmas):
            raise AuditError("noise sigmas must be >= 0.")
        if self.train_prompts < 10:
            raise AuditError(f"train_prompts={self.train_prompts}: the inverter needs at least 10 attacker prompts.")
        return self


@dataclass
class _Targets:
    """What is being scored on one set of sequences."""

    positions: list[np.ndarray]  # per sequence, private token positions (absolute)
    tokens: np.ndarray  # true tokens at all those positions, concatenated
    seq_of: np.ndarray  # sequence index of each row
    is_target: np.ndarray  # row lies in the target span
    spans: list[list[tuple[int, int, int, bool]]] = field(default_factory=list)  # (row_lo, row_hi, item, is_target)


def _targets(sequences: Sequence[AuditSequence]) -> _Targets:
    positions, tokens, seq_of, is_target, spans = [], [], [], [], []
    row = 0
    for i, s in enumerate(sequences):
        pos, mine = [], []
        for span, tgt in [(sp, False) for sp in s.history] + ([(s.target, True)] if s.target else []):
            rng = list(range(span.start, span.end))
            mine.append((row + len(pos), row + len(pos) + len(rng), span.item_id, tgt))
            pos.extend(rng)
            is_target.extend([tgt] * len(rng))
        positions.append(np.array(pos, dtype=np.int64))
        tokens.extend(s.input_ids[p] for p in pos)
        seq_of.extend([i] * len(pos))
        spans.append(mine)
        row += len(pos)
    return _Targets(positions, np.array(tokens, dtype=np.int64), np.array(seq_of), np.array(is_target, dtype=bool),
                    spans)


Defend = Callable[[np.ndarray, int], np.ndarray]  # (vectors of sequence i, i) -> what the server sees


def _features(observed: Observed, targets: _Targets, window: int, noise: tuple[float, int] | None = None,
              defend: Defend | None = None) -> np.ndarray:
    blocks = []
    for i, pos in enumerate(targets.positions):
        raw = observed.raw(i)
        if noise is not None:
            raw = add_relative_noise(raw, noise[0], derive_seed(noise[1], i))
        if defend is not None:
            raw = defend(raw, i)
        blocks.append(window_features(raw, pos - observed.offset[i], window))
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)


def candidate_tokens(tokenizer, titles: Mapping[int, str], extra: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Every token a catalogue title can occupy in a prompt (the attacker's output vocabulary)."""
    texts = [f' "{t}",' for t in titles.values()] + [format_response(t) for t in titles.values()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.unique(np.concatenate([np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]), *extra]))


def _score(predicted: np.ndarray, targets: _Targets, tokenizer, matcher: TitleMatcher) -> dict[str, float]:
    correct = predicted == targets.tokens
    hist = ~targets.is_target
    spans = [(i, *sp) for i, user in enumerate(targets.spans) for sp in user]
    texts = [tokenizer.decode(predicted[lo:hi].tolist()) for _, lo, hi, _, _ in spans]
    items = [item for _, _, _, item, _ in spans]
    found = matcher.identified(texts, items) if spans else np.zeros(0, bool)
    top5 = (found | matcher.in_top(texts, items, 5)) if spans else np.zeros(0, bool)
    per_user: dict[int, list[bool]] = {}
    per_user_top5: dict[int, list[bool]] = {}
    target_found = []
    for (i, _, _, _, is_tgt), hit, hit5 in zip(spans, found, top5):
        (target_found if is_tgt else per_user.setdefault(i, [])).append(bool(hit))
        if not is_tgt:
            per_user_top5.setdefault(i, []).append(bool(hit5))
    return {
        "token_acc": float(correct[hist].mean()) if hist.any() else float("nan"),
        "target_token_acc": float(correct[~hist].mean()) if (~hist).any() else float("nan"),
        "history_item_recall": float(np.mean([np.mean(v) for v in per_user.values()])) if per_user else float("nan"),
        "target_item_recall": float(np.mean(target_found)) if target_found else float("nan"),
        "n_history_items": int(sum(len(v) for v in per_user.values())),
        # the item among the attacker's 5 best catalogue guesses for the span (identify.TitleMatcher.in_top)
        "history_item_recall_top5": (float(np.mean([np.mean(v) for v in per_user_top5.values()]))
                                     if per_user_top5 else float("nan")),
    }


def _attack(train_obs: Observed, eval_obs: Observed, train_t: _Targets, eval_t: _Targets, embeddings: np.ndarray,
            candidates: np.ndarray, settings: AuditSettings, tokenizer, matcher: TitleMatcher,
            noise: float = 0.0, defend_train: Defend | None = None, defend_eval: Defend | None = None
            ) -> dict[str, float]:
    """Fit the inverter on the attacker's observations, score it on the victims'. ``defend_*``
    change what the server sees (the attacker's own copy of the defence for training, the
    client's for the victims)."""
    noise_train = (noise, derive_seed(settings.seed, "noise-train", noise)) if noise else None
    noise_eval = (noise, derive_seed(settings.seed, "noise-eval", noise)) if noise else None
    x_train = _features(train_obs, train_t, settings.window, noise_train, defend_train)
    inverter = fit_inverter(x_train, train_t.tokens, embeddings, candidates, train_t.seq_of, settings.alphas,
                            seed=derive_seed(settings.seed, "holdout"))
    del x_train
    predicted = inverter.tokens(_features(eval_obs, eval_t, settings.window, noise_eval, defend_eval), candidates,
                                embeddings[candidates])
    return {**_score(predicted, eval_t, tokenizer, matcher), "ridge_alpha": inverter.alpha}


def _cut_plan(settings: AuditSettings, num_layers: int) -> list[tuple[int, str, str, int]]:
    """(k, direction, observed, hidden index) for every row."""
    plan = []
    if "front" in settings.directions:
        plan += [(k, "front", "activation", k) for k in sorted(set(settings.front_cuts))]
    if "back" in settings.directions:
        for k in sorted(set(settings.back_cuts)):
            plan += [(k, "back", "activation", num_layers - k), (k, "back", "gradient", num_layers - k)]
    return plan


def run_audit(model: torch.nn.Module, tokenizer, titles: Mapping[int, str],
              examples: Sequence[tuple[int, Sequence[int], int]], settings: AuditSettings = AuditSettings()
              ) -> pd.DataFrame:
    """The recovery table for one model: one row per (k, direction, observed) [+ noise rows].

    ``examples``: the victims, as (user_id, history item ids oldest first, target item id);
    ``titles``: the public catalogue (item id -> title), also the attacker's prompt source.
    """
    num_layers = int(model.config.num_hidden_layers)
    settings.validate(num_layers)
    if not examples:
        raise AuditError("no evaluation users; pass at least one (user, history, target) example.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    attacker = [encode_sequence(tokenizer, titles, h, t, settings.max_length)
                for h, t in synthetic_histories(sorted(titles), settings.train_prompts, settings.history_len,
                                                derive_seed(settings.seed, "attacker-prompts"))]
    victims = [encode_sequence(tokenizer, titles, h, t, settings.max_length) for _, h, t in examples]
    plan = _cut_plan(settings, num_layers)
    act_layers = sorted({j for _, _, kind, j in plan if kind == "activation"}
                        | ({settings.noise_cut} if settings.noise_sigmas else set()))
    grad_layers = sorted({j for _, _, kind, j in plan if kind == "gradient"})
    observe_args = dict(activation_layers=act_layers, gradient_layers=grad_layers, pad_id=pad_id,
                        batch_size=settings.batch_size, train_on_inputs=settings.train_on_inputs)
    train_obs = observe(model, attacker, desc="attacker prompts", **observe_args)
    eval_obs = observe(model, victims, desc="real users", **observe_args)
    train_t, eval_t = _targets(attacker), _targets(victims)
    embeddings = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    candidates = candidate_tokens(tokenizer, titles, [train_t.tokens])
    matcher = TitleMatcher(titles)

    def pick(obs: Observations, kind: str, j: int) -> Observed:
        return (obs.activations if kind == "activation" else obs.gradients)[j]

    rows = []
    for k, direction, kind, j in tqdm(plan, desc="attacking cuts", unit="cut"):
        scores = _attack(pick(train_obs, kind, j), pick(eval_obs, kind, j), train_t, eval_t, embeddings,
                         candidates, settings, tokenizer, matcher)
        rows.append({"k": k, "direction": direction, "observed": kind, "hidden_index": j, "noise_sigma": 0.0,
                     **scores, "n_eval": len(victims), "n_train_prompts": len(attacker), "lm_loss": float("nan")})
    for sigma in tqdm(settings.noise_sigmas, desc="noise defence", unit="sigma"):
        j = settings.noise_cut
        scores = _attack(train_obs.activations[j], eval_obs.activations[j], train_t, eval_t, embeddings,
                         candidates, settings, tokenizer, matcher, noise=float(sigma))
        noise = NoiseAt(j, float(sigma), derive_seed(settings.seed, "noise-loss", sigma))
        loss = mean_loss(model, victims[:settings.noise_loss_users], pad_id, settings.batch_size,
                         settings.train_on_inputs, noise)
        rows.append({"k": j, "direction": "front", "observed": "activation+noise", "hidden_index": j,
                     "noise_sigma": float(sigma), **scores, "n_eval": len(victims),
                     "n_train_prompts": len(attacker), "lm_loss": loss})
    return pd.DataFrame(rows, columns=COLUMNS)
