"""Evaluate the generative recommender: generate -> ground -> Recall/NDCG (BIGRec protocol).

For each user: build the prompt from the history titles, beam-search a response with the
(LoRA-tuned) model, keep only the newly generated tokens, cut out the response text, embed
it with the BASE model (adapters off), rank the catalogue's title groups by L2 distance
with the user's history masked, and score the target's position. Duplicate-title and
masking semantics: see `fellrec_flwr.eval.grounding`.

`eval.decoding='constrained'` replaces generate -> ground by catalogue-constrained
decoding (`fellrec_flwr.eval.constrained`): the model may only write catalogue titles and the
top-K titles by log-likelihood are the list (history masked the same way).

Every stage is injectable (`prompt_fn`, `generate_fn`, `extract_fn`, `embed_fn`) so that
the split-model path can route generation and embedding through the split service, and
tests can pin one stage.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from fellrec_flwr.progress import tqdm
from transformers import GenerationConfig

from fellrec_flwr.config import DECODINGS, EvalSettings
from fellrec_flwr.eval.constrained import ConstrainedRanker, TitlePrior, TitleTrie, build_title_trie
from fellrec_flwr.eval.grounding import Catalogue, EmbedFn, GroundingError, TitleGroups, embed_texts, rank
from fellrec_flwr.eval.metrics import DEFAULT_KS, ranking_metrics, target_ranks

PromptFn = Callable[[Sequence[str]], Any]  # history titles -> prompt str (or (prompt, response))
GenerateFn = Callable[[Sequence[str]], list[str]]  # prompts -> generated continuations
ExtractFn = Callable[[str], str]  # generated continuation -> the title text to ground

# Title tries per catalogue (weakly held: they go with the catalogue) and tokenizer.
_TRIES: "weakref.WeakKeyDictionary[TitleGroups, weakref.WeakKeyDictionary[Any, TitleTrie]]" = \
    weakref.WeakKeyDictionary()


def _default_prompt_fn() -> PromptFn:
    from fellrec_flwr.data.prompts import build_prompt  # lazy: keeps this module importable on its own

    return build_prompt


def _default_extract_fn() -> ExtractFn:
    from fellrec_flwr.data.prompts import extract_response

    return extract_response


def _prompt_text(result: Any) -> str:
    # build_prompt may return the prompt alone or (prompt, response); the prompt ends with
    # the response marker, so the model continues with the title.
    return result[0] if isinstance(result, tuple) else result


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], eval_cfg: EvalSettings,
                   progress: bool = True) -> list[str]:
    """Beam search (eval_cfg.num_beams, eval_cfg.max_new_tokens); returns only the new text.

    Prompts are left-padded (so every prompt ends where generation starts) and batched
    shortest first; greedy beam search, no sampling, whatever the model's own generation
    defaults say. Works for a PeftModel (adapters on) and a plain model.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise GroundingError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
    gen_cfg = GenerationConfig(
        num_beams=eval_cfg.num_beams, max_new_tokens=eval_cfg.max_new_tokens, do_sample=False,
        num_return_sequences=1, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]] if prompts else []
    order = np.argsort(lengths, kind="stable")
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    size = max(1, eval_cfg.batch_size)
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="generating", disable=not progress, unit="batch"):
                enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
                out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                     generation_config=gen_cfg)
                new_tokens = out[:, enc["input_ids"].shape[1]:]
                for index, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    outputs[index] = text
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return outputs


def constrained_ranker(model: Any, tokenizer: Any, catalogue: Catalogue, eval_cfg: EvalSettings,
                       prompt_fn: PromptFn | None = None) -> ConstrainedRanker:
    """The catalogue trie for (tokenizer, catalogue), built once and reused, with `eval_cfg`'s settings.

    The neutral prompt of the title prior is the prompt of an empty history. Priors are
    recomputed per call (they depend on the adapters being evaluated); the trie is not.
    """
    from fellrec_flwr.data.collate import prompt_token_ids

    prompt_fn = prompt_fn or _default_prompt_fn()
    tries = _TRIES.setdefault(catalogue.groups, weakref.WeakKeyDictionary())
    if tokenizer not in tries:
        tries[tokenizer] = build_title_trie(tokenizer, catalogue.groups.titles)
    trie = tries[tokenizer]
    prior = None
    if eval_cfg.prior_weight != 0.0:
        neutral = prompt_token_ids(tokenizer, _prompt_text(prompt_fn([])))
        prior = TitlePrior(model, neutral, trie, length_norm=eval_cfg.length_norm,
                           pad_token_id=_pad_token(tokenizer))
    return ConstrainedRanker(model, tokenizer, trie, beams=eval_cfg.constrained_beams,
                             prior_weight=eval_cfg.prior_weight, length_norm=eval_cfg.length_norm,
                             batch_users=max(1, eval_cfg.batch_size), prior=prior)


def rank_constrained(model: Any, tokenizer: Any, prompts: Sequence[str], histories: Sequence[Sequence[int]],
                     catalogue: Catalogue, eval_cfg: EvalSettings, k: int, prompt_fn: PromptFn | None = None,
                     progress: bool = True) -> np.ndarray:
    """(users, k) item ids by constrained decoding (history title groups masked), -1 padded."""
    from fellrec_flwr.data.collate import prompt_token_ids  # the prompt tokens exactly as in training

    if not prompts:
        return np.zeros((0, k), dtype=np.int64)
    ranker = constrained_ranker(model, tokenizer, catalogue, eval_cfg, prompt_fn)
    token_prompts = [prompt_token_ids(tokenizer, p) for p in prompts]
    masked = [catalogue.groups.group_index(h).tolist() for h in histories]
    groups, _ = ranker.rank(token_prompts, masked, k, progress=progress)
    return np.where(groups >= 0, catalogue.groups.rep_ids[np.maximum(groups, 0)], -1)


def _pad_token(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def evaluate_recommender(model: Any, tokenizer: Any, examples: Sequence[Any], titles: Mapping[int, str],
                         catalogue: Catalogue, eval_cfg: EvalSettings, prompt_fn: PromptFn | None = None,
                         progress: bool = True, *, ks: Sequence[int] = DEFAULT_KS,
                         generate_fn: GenerateFn | None = None, extract_fn: ExtractFn | None = None,
                         embed_fn: EmbedFn | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Recall@K / NDCG@K of the model's generated titles, grounded to `catalogue`.

    examples: objects with `user_id`, `history` (item ids, oldest first) and `target`.
    Returns (metrics, rows). metrics: recall@K and ndcg@K for K in `ks`, num-users, and
    valid-title-rate (fraction of extracted generations that equal a catalogue title
    exactly). rows, one per user in input order: user_id, target, generated (the extracted
    text), valid_title, top10 (item ids), target_rank (0-based within the top max(ks),
    -1 if not there) and target_masked (the target shares its title with a history item,
    so it could not be recommended).
    Defaults: prompts.build_prompt / prompts.extract_response, `generate_texts` with
    `model`, and `embed_texts` with the base model (adapters off).
    With ``eval_cfg.decoding == 'constrained'`` the list comes from `rank_constrained`
    (generate_fn/extract_fn/embed_fn are not used) and `generated` is the top title.
    """
    if not ks or min(ks) < 1:
        raise GroundingError(f"ks={list(ks)} must be a non-empty list of positive cut-offs.")
    prompt_fn = prompt_fn or _default_prompt_fn()
    extract_fn = extract_fn or _default_extract_fn()
    if generate_fn is None:
        def generate_fn(prompts: Sequence[str]) -> list[str]:
            return generate_texts(model, tokenizer, prompts, eval_cfg, progress)
    if embed_fn is None:
        def embed_fn(texts: Sequence[str]) -> np.ndarray:
            return embed_texts(model, tokenizer, texts, max(1, eval_cfg.batch_size), progress, desc="grounding")

    histories = [list(ex.history) for ex in examples]
    targets = np.array([int(ex.target) for ex in examples], dtype=np.int64)
    target_groups = catalogue.groups.group_index(targets)  # fails early, clearly, on unknown targets
    masks = catalogue.history_mask(histories)

    missing = sorted({i for h in histories for i in h if i not in titles})
    if missing:
        raise GroundingError(f"history item ids {missing[:5]} have no title; pass the prepared data's titles.")
    prompts = [_prompt_text(prompt_fn([titles[i] for i in h])) for h in histories]

    k_max = max(ks)
    if eval_cfg.decoding == "constrained":
        ranked = rank_constrained(model, tokenizer, prompts, histories, catalogue, eval_cfg, k_max, prompt_fn,
                                  progress)
        # The "generated" text is the top title: always a catalogue title by construction.
        generated = [catalogue.groups.titles[catalogue.groups.group_of[i]] if i >= 0 else "" for i in ranked[:, 0]]
    elif eval_cfg.decoding == "beam-l2":
        generated = [extract_fn(text) for text in generate_fn(prompts)] if prompts else []
        if len(generated) != len(prompts):
            raise GroundingError(f"generate_fn returned {len(generated)} texts for {len(prompts)} prompts.")
        if prompts:
            queries = np.asarray(embed_fn(generated), dtype=np.float32)
            ranked = rank(queries, catalogue, masks, k_max)
        else:
            ranked = np.zeros((0, k_max), dtype=np.int64)
    else:
        raise GroundingError(f"eval.decoding={eval_cfg.decoding!r} is not one of {', '.join(DECODINGS)}.")
    ranks = target_ranks(ranked, targets, canonical=catalogue.canonical)

    valid = [text in catalogue.groups.by_title for text in generated]
    metrics = ranking_metrics(ranks, ks)
    metrics["num-users"] = len(examples)
    metrics["valid-title-rate"] = float(np.mean(valid)) if valid else 0.0

    rows = [
        {
            "user_id": int(ex.user_id),
            "target": int(ex.target),
            "generated": text,
            "valid_title": bool(ok),
            "top10": ranked[row, :10].tolist(),
            "target_rank": int(ranks[row]),
            "target_masked": bool(masks[row, target_groups[row]]),
        }
        for row, (ex, text, ok) in enumerate(zip(examples, generated, valid))
    ]
    return metrics, rows
