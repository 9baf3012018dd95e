"""The privacy-quality curve of the wire defences (issue 25): for each defence setting, how much of a
user's history the server recovers, and what the defence costs in Recall@10.

Settings (``strength`` 0 = no defence, the shared starting point of every line):

- ``noise``: `split.defence = noise` at the configured cut, strength = `split.noise-sigma`
  (clip each position to `noise-clip` x the median norm, then Gaussian noise; see
  :mod:`fellrec_flwr.split.defence`, the very function the split client runs). It acts on both
  things the client sends: the front-cut activations and the back-cut gradients.
- ``front-k``: a deeper front cut, strength = extra client layers (`split.front-k` - 1).
- ``nopeek``: `split.defence = nopeek`, strength = `split.nopeek-alpha`: the client trains its LoRA with
  alpha x dCor(token embeddings, front-cut activations) added to its loss (:mod:`fellrec_flwr.split.nopeek`);
  what it sends is then not changed further.

What the server sees, per setting, are two channels: the front-cut activation (hidden state
``front_k``) and, in training, the gradient at the back cut (hidden state ``L - back_k``).
The inverter (:mod:`fellrec_flwr.audit.inverter`) is trained as the attacker would: on its own
synthetic prompts through the public model, with the same defence and parameters applied by
its own random stream (it knows sigma and the clip rule, not the client's noise). A second attacker
fits its inverter on its prompts through the **client's trained model** (in federated training the
server aggregates the clients' LoRA, so it may hold it): that is how a NoPeek client is attacked by
someone who knows the defence and alpha, and it is run for every setting. ``recovery_*`` is the
largest history-item recovery over the two channels and the two attackers (the server has all).

Quality: Recall@10 of the model on the same users with the defence really applied in inference
(hooks on the layer at the cut reproduce what `split.client.RemoteBody` sends; the clip's median
is taken over the real tokens of each call, as the client does). The interval is a paired
bootstrap of the difference to strength 0 over the same users (`eval.bootstrap`). A deeper cut
changes where layers run, not what they compute (tests/test_split.py), so its recall is the
strength-0 recall. Gradient noise only acts in training, which this curve does not redo (see
docs/privacy_audit.md, "Not done").
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from fellrec_flwr.audit.attacks import AuditSettings, Defend, _attack, _targets, candidate_tokens
from fellrec_flwr.audit.identify import TitleMatcher
from fellrec_flwr.audit.observe import decoder_layers, observe
from fellrec_flwr.audit.sequences import AuditError, encode_sequence, synthetic_histories
from fellrec_flwr.config import EvalSettings
from fellrec_flwr.progress import tqdm
from fellrec_flwr.seeding import derive_seed
from fellrec_flwr.split.defence import DefenceError, WireDefence, check_noise_settings, clip_and_noise
from fellrec_flwr.split.nopeek import NoPeek, NoPeekError, check_alpha

CURVE_COLUMNS = ["dataset", "defence", "strength", "recovery_top1", "recovery_top5", "recall@10", "recall_ci_low",
                 "recall_ci_high", "n_users"]
DETAIL_COLUMNS = ["defence", "strength", "channel", "attacker", "hidden_index", "token_acc", "history_item_recall",
                  "history_item_recall_top5", "target_item_recall", "ridge_alpha", "n_eval"]
RECALL_K = 10


@dataclass(frozen=True)
class CurveSettings:
    front_k: int = 1  # the cut the noise sweep runs at (the config default)
    back_k: int = 1
    noise_sigmas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    noise_clip: float = 1.0
    deeper_front_ks: tuple[int, ...] = (2,)  # the front-k line: these cuts instead of front_k
    nopeek_alphas: tuple[float, ...] = ()  # the nopeek line (split.nopeek-alpha), at front_k
    replicates: int = 2000  # paired bootstrap

    def validate(self, num_layers: int) -> "CurveSettings":
        for k in (self.front_k, *self.deeper_front_ks):
            if not 1 <= k or k + self.back_k >= num_layers:
                raise AuditError(f"front_k={k} with back_k={self.back_k} is not a split of this {num_layers}-layer "
                                 f"model (each >= 1, front_k + back_k <= {num_layers - 1}).")
        if any(k <= self.front_k for k in self.deeper_front_ks):
            raise AuditError(f"deeper front cuts {list(self.deeper_front_ks)} must all exceed front_k={self.front_k}.")
        try:
            for sigma in self.noise_sigmas:
                check_noise_settings(sigma, self.noise_clip)
            for alpha in self.nopeek_alphas:
                check_alpha(alpha)
        except (DefenceError, NoPeekError) as err:
            raise AuditError(str(err)) from None
        if self.replicates < 100:
            raise AuditError(f"replicates={self.replicates}: a bootstrap interval needs at least 100.")
        return self


# -- the defence where the model runs (quality) ------------------------------------------------------


@contextlib.contextmanager
def defended_at(model: torch.nn.Module, layer: int, defence: WireDefence,
                grad_layer: int | None = None) -> Iterator[None]:
    """Run ``model`` with ``defence`` applied as the split client applies it: to the input of decoder
    ``layer`` (what it sends forward) and, in training, to the gradient w.r.t. the input of
    ``grad_layer`` (what it returns at the back cut). The clip's median is over the real tokens of
    each call; the backward pass through the front cut is straight-through, as in `RemoteBody`."""
    if not defence.active:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    padding: list[torch.Tensor | None] = [None]

    def keep_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        padding[0] = mask if torch.is_tensor(mask) and mask.dim() == 2 else None

    def sent_mask(h: torch.Tensor) -> torch.Tensor | None:
        mask = padding[0]
        return mask[:, -h.shape[1]:].to(torch.bool) if mask is not None else None  # the tokens being sent

    def protect(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        clean = h.detach()
        sent = h + (defence.protect(clean, sent_mask(h)) - clean)  # value: the defended tensor; gradient: identity
        return ((sent, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": sent})

    def protect_gradient(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.requires_grad:
            mask = sent_mask(h)
            h.register_hook(lambda g: defence.protect(g, mask))

    handles = [decoder.register_forward_pre_hook(keep_mask, with_kwargs=True),
               decoder_layers(model)[layer].register_forward_pre_hook(protect, with_kwargs=True)]
    if grad_layer is not None:
        handles.append(decoder_layers(model)[grad_layer].register_forward_pre_hook(protect_gradient, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def user_hits(model, tokenizer, titles: Mapping[int, str], examples: Sequence[tuple[int, Sequence[int], int]],
              eval_cfg: EvalSettings, catalogue=None) -> np.ndarray:
    """Per user, 1.0 when the target is in the model's top 10 (Recall@10's per-user value)."""
    from fellrec_flwr.eval.evaluate import evaluate_recommender
    from fellrec_flwr.eval.grounding import Catalogue

    catalogue = catalogue or Catalogue.build(model, tokenizer, titles, cache_dir=None, progress=False)
    users = [SimpleNamespace(user_id=u, history=list(h), target=t) for u, h, t in examples]
    _, rows = evaluate_recommender(model, tokenizer, users, titles, catalogue, eval_cfg, progress=False)
    return np.array([1.0 if 0 <= r["target_rank"] < RECALL_K else 0.0 for r in rows])


def finetune_lora(model, tokenizer, titles: Mapping[int, str], train_examples: Sequence, epochs: int, front_k: int,
                  back_k: int, seed: int, nopeek_alpha: float = 0.0):
    """The model a split client would have trained: LoRA (the config's defaults) on its held layers only,
    `epochs` passes over ``train_examples`` (objects with history and target), with NoPeek's term in its
    loss when ``nopeek_alpha`` > 0 (as `heads.train_head` adds it). Returns the PeftModel."""
    from dataclasses import replace

    from fellrec_flwr.config import LoraSettings, TrainSettings
    from fellrec_flwr.model.loading import add_lora
    from fellrec_flwr.split.plan import plan_for_model
    from fellrec_flwr.split.runtime import client_lora_settings
    from fellrec_flwr.train.trainer import train_local

    plan = plan_for_model(model, front_k, back_k)
    peft = add_lora(model, client_lora_settings(LoraSettings(), plan), derive_seed(seed, "lora"))
    nopeek = NoPeek(nopeek_alpha, derive_seed(seed, "nopeek")).attach(peft, front_k)
    train_local(peft, tokenizer, list(train_examples), titles, replace(TrainSettings(), local_epochs=epochs),
                derive_seed(seed, "finetune"), progress=False, penalty=nopeek.take if nopeek.active else None)
    nopeek.detach()
    return peft.eval()


# -- the attack on what the server sees (privacy) ---------------------------------------------------


def _noise(sigma: float, clip: float, seed: int) -> Defend:
    """The client's defence on one sequence's vectors (one call), with its own stream per sequence."""
    def defend(vectors: np.ndarray, i: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(derive_seed(seed, i))
        return clip_and_noise(torch.from_numpy(vectors), sigma, clip, gen).numpy()
    return defend


def run_curve(model: torch.nn.Module, tokenizer, titles: Mapping[int, str],
              examples: Sequence[tuple[int, Sequence[int], int]], dataset: str,
              audit: AuditSettings = AuditSettings(), curve: CurveSettings = CurveSettings(),
              eval_cfg: EvalSettings = EvalSettings(), train_examples: Sequence = (),
              finetune_epochs: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curve, detail): one curve row per defence setting (CURVE_COLUMNS), one detail row per setting
    and channel (DETAIL_COLUMNS).

    ``model`` is the public base model. With ``finetune_epochs`` > 0 each setting's client first
    trains its LoRA on ``train_examples`` with that defence on (noisy activations forward, noisy
    gradients back), and is then attacked and evaluated; otherwise the base model is.
    """
    num_layers = int(model.config.num_hidden_layers)
    curve.validate(num_layers)
    if not examples:
        raise AuditError("no evaluation users; pass at least one (user, history, target) example.")
    if finetune_epochs > 0 and not train_examples:
        raise AuditError("finetune_epochs > 0 needs train_examples (the clients' training prompts).")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    attacker = [encode_sequence(tokenizer, titles, h, t, audit.max_length)
                for h, t in synthetic_histories(sorted(titles), audit.train_prompts, audit.history_len,
                                                derive_seed(audit.seed, "attacker-prompts"))]
    victims = [encode_sequence(tokenizer, titles, h, t, audit.max_length) for _, h, t in examples]
    grad_j = num_layers - curve.back_k
    act_js = sorted({curve.front_k, *curve.deeper_front_ks})
    args = dict(activation_layers=act_js, gradient_layers=[grad_j], pad_id=pad_id, batch_size=audit.batch_size,
                train_on_inputs=audit.train_on_inputs)
    # the attacker has the public base model, not the client's LoRA (a secret too)
    train_obs = observe(model, attacker, desc="attacker prompts", **args)
    train_t, eval_t = _targets(attacker), _targets(victims)
    embeddings = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    candidates = candidate_tokens(tokenizer, titles, [train_t.tokens])
    matcher = TitleMatcher(titles)

    from fellrec_flwr.eval.bootstrap import paired_difference_ci
    from fellrec_flwr.eval.grounding import Catalogue

    catalogue = Catalogue.build(model, tokenizer, titles, cache_dir=None, progress=False)
    # (noise sigma, nopeek alpha); (0, 0) = none -> (model, victims' observations, attacker's through it)
    clients: dict[tuple[float, float], tuple[torch.nn.Module, object, object]] = {}

    def client(sigma: float, alpha: float, wire: WireDefence) -> tuple[torch.nn.Module, object, object]:
        if (sigma, alpha) not in clients:
            trained = model
            if finetune_epochs > 0:
                trained = copy.deepcopy(model)
                with defended_at(trained, curve.front_k, wire, grad_layer=grad_j):
                    trained = finetune_lora(trained, tokenizer, titles, train_examples, finetune_epochs,
                                            curve.front_k, curve.back_k, audit.seed, nopeek_alpha=alpha)
            # observed clean; the server's view is the client's defence applied to it (below)
            observed = observe(trained, victims, desc="real users", **args)
            through = observe(trained, attacker, desc="attacker prompts, client model", **args) \
                if trained is not model else train_obs
            clients[(sigma, alpha)] = (trained, observed, through)
        return clients[(sigma, alpha)]

    settings = [("none", 0.0)] + [("noise", float(s)) for s in curve.noise_sigmas if s > 0] + \
               [("front-k", float(k - curve.front_k)) for k in curve.deeper_front_ks] + \
               [("nopeek", float(a)) for a in curve.nopeek_alphas if a > 0]
    detail, rows, base = [], [], None
    for defence, strength in tqdm(settings, desc="defence settings", unit="setting"):
        sigma = strength if defence == "noise" else 0.0
        alpha = strength if defence == "nopeek" else 0.0
        wire = WireDefence("noise" if sigma else "none", sigma, curve.noise_clip,
                           derive_seed(audit.seed, "client", sigma))
        trained, eval_obs, client_obs = client(sigma, alpha, wire)
        front_j = curve.front_k + int(strength) if defence == "front-k" else curve.front_k
        mine = []
        for channel, j, kind in (("front activation", front_j, "activations"), ("back gradient", grad_j, "gradients")):
            eval_o = getattr(eval_obs, kind)[j]
            for who, seen in (("base model", train_obs), ("client model", client_obs)):
                if who == "client model" and client_obs is train_obs:
                    continue  # no fine-tune: the client's model is the base model
                defend_train = defend_eval = None
                if sigma:  # the attacker knows sigma and the clip rule, not the client's noise
                    defend_train = _noise(sigma, curve.noise_clip, derive_seed(audit.seed, "attacker", sigma, j))
                    defend_eval = _noise(sigma, curve.noise_clip, derive_seed(audit.seed, "client", sigma, j))
                scores = _attack(getattr(seen, kind)[j], eval_o, train_t, eval_t, embeddings, candidates, audit,
                                 tokenizer, matcher, defend_train=defend_train, defend_eval=defend_eval)
                mine.append(scores)
                detail.append({"defence": defence, "strength": strength, "channel": channel, "attacker": who,
                               "hidden_index": j, **scores, "n_eval": len(victims)})
        # a deeper cut changes where layers run, not what they compute: its recall is strength 0's
        if base is None or sigma or alpha:
            with defended_at(trained, curve.front_k, wire):
                hits = user_hits(trained, tokenizer, titles, examples, eval_cfg, catalogue)
        else:
            hits = base
        base = hits if base is None else base
        diff = paired_difference_ci(hits, base, curve.replicates, derive_seed(audit.seed, "bootstrap"))
        rows.append({"dataset": dataset, "defence": defence, "strength": strength,
                     "recovery_top1": max(m["history_item_recall"] for m in mine),
                     "recovery_top5": max(m["history_item_recall_top5"] for m in mine),
                     "recall@10": float(hits.mean()), "recall_ci_low": diff.low, "recall_ci_high": diff.high,
                     "n_users": len(hits)})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS), pd.DataFrame(detail)[DETAIL_COLUMNS]
