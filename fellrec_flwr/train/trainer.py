"""Local training of a client's LoRA: a plain torch loop (AdamW), and a validation loss.

The loss of one optimiser step is the mean over every label token of the step's
micro-batches (sum of token losses / token count), so gradient accumulation gives the
same step as one big batch. The FedProx proximal term 0.5*mu*||theta - theta_received||^2
over the trainable parameters is added to the objective but not to the reported loss.

Learning rate: ``train.lr-schedule`` 'constant' or 'linear' (decay to ~0 at the last step),
after ``train.warmup-steps`` of linear warm-up (see :func:`lr_factor`); the schedule restarts
with every call, i.e. every round, as the authors' per-round HF Trainer does.

Speed options (fellrec_flwr/model/speed.py; bench/train_speed.py measures them): bf16 autocast
(``train.autocast``), length bucketing (``train.length-bucketing``), the LM head only on
labelled positions (``train.labelled-logits-only``), its loss a chunk of positions at a time
(``train.loss-chunk-mb``, a memory bound) and the frozen prefix's activations cached when
LoRA sits in the last layers only (``train.prefix-cache-mb``).

Reproducible: shuffling uses a private generator and dropout runs under a forked,
seeded torch RNG, both derived from `seed`; on CPU two calls with the same seed and
starting weights give bit-identical results.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from fellrec_flwr.progress import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fellrec_flwr.data.collate import (
    IGNORE_INDEX,
    EncodedExample,
    ExampleLike,
    Titles,
    TrainCollator,
    bucketed_batches,
    encode_examples,
    pad_token_id_of,
)
from fellrec_flwr.config import TrainSettings
from fellrec_flwr.data.prompts import GAMES, PromptDomain
from fellrec_flwr.seeding import derive_seed, seeded_torch, torch_generator
from fellrec_flwr.model.speed import FastForward, default_chooser, pad_hidden

LR_SCHEDULES = ("constant", "linear")
BUCKET_CHUNK_BATCHES = 16  # length bucketing sorts within chunks of this many batches


class TrainingError(ValueError):
    """Local training cannot run as asked (no examples, no trainable parameters, bad factor)."""


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean over optimiser steps of the step's token-mean loss (no proximal term)
    steps: int  # optimiser steps taken
    num_examples: int  # training examples (per epoch): the FedAvg weight


# --------------------------------------------------------------------------- pure pieces


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over labelled positions, and their count.

    Position t predicts labels[t+1]; IGNORE_INDEX labels are skipped.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, count_label_tokens(labels)


def count_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def proximal_term(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: 0.5 * mu * sum_k ||params_k - anchors_k||^2."""
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    return 0.5 * mu * total


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based) of `total_steps`.

    Warm-up: (step+1)/warmup for the first `warmup_steps` steps (so the first step already
    moves, unlike transformers' step/warmup). Then 'constant' stays at 1 and 'linear' decays
    as (total - step)/(total - warmup): 1 right after warm-up, 1/(total - warmup) at the last step.
    """
    if schedule not in LR_SCHEDULES:
        raise TrainingError(f"train.lr-schedule={schedule!r} is not one of {', '.join(LR_SCHEDULES)}.")
    if warmup_steps < 0:
        raise TrainingError(f"train.warmup-steps={warmup_steps} must be >= 0.")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def _index_batches(features: Sequence[EncodedExample], batch_size: int, order: Sequence[int],
                   bucketing: bool, generator: torch.Generator) -> list[list[int]]:
    if bucketing:
        lengths = [len(f.input_ids) for f in features]
        return bucketed_batches(lengths, order, batch_size, BUCKET_CHUNK_BATCHES, generator)
    return [list(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]


def _collate(features: Sequence[EncodedExample], index_batches: Sequence[Sequence[int]], collator: TrainCollator,
             prefix: Sequence[torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:
    """Collated batches; with cached prefix states, each batch also carries them ("prefix_hidden")."""
    out = []
    for idx in index_batches:
        batch = collator([features[i] for i in idx])
        if prefix is not None:
            batch["prefix_hidden"] = pad_hidden([prefix[i] for i in idx])
        out.append(batch)
    return out


def fast_forward(model: torch.nn.Module, train_cfg: TrainSettings, device: torch.device,
                 features: Sequence[EncodedExample], collator: TrainCollator, backward: bool) -> FastForward:
    """The loss forward the speed settings ask for (see fellrec_flwr/model/speed.py).

    For ``train.autocast='auto'`` the first batch of `features` is the timing probe (a
    training step without the optimiser when `backward`, a forward pass otherwise).
    """
    forward = FastForward(model, device, labelled_logits_only=train_cfg.labelled_logits_only,
                          prefix_cache_mb=train_cfg.prefix_cache_mb, loss_chunk_mb=train_cfg.loss_chunk_mb)
    sample = collator(list(features[:train_cfg.batch_size]))

    def step(dtype: torch.dtype | None) -> None:
        forward.dtype = dtype
        if backward:
            forward.loss_sum(sample)[0].backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                forward.loss_sum(sample)

    forward.dtype = default_chooser().choose(train_cfg.autocast, device, model, step)
    return forward


CHECKPOINT_LAYERS = ("split", "on", "off")


def checkpoint_layers_wanted(choice: str, split: bool) -> bool:
    """``train.checkpoint-layers``: 'split' = only for a split client (whose point is a small memory)."""
    if choice not in CHECKPOINT_LAYERS:
        raise TrainingError(f"train.checkpoint-layers={choice!r} is not one of {', '.join(CHECKPOINT_LAYERS)}.")
    return choice == "on" or (choice == "split" and split)


@contextlib.contextmanager
def checkpointed_layers(model: torch.nn.Module, enabled: bool):
    """Activation checkpointing of the model's decoder layers while inside (restored after).

    Each layer keeps only its input for backward and recomputes the rest there: a layer's
    activations for 4 x 128 tokens of SmolLM2 are ~35 MB under bf16 autocast, so a client's
    training memory stops growing with its number of layers, for one more forward of them. The
    recomputation repeats the same operations under the same RNG state (exact). A split client's
    proxy to the service is no decoder layer and is never recomputed (never called twice).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled or not getattr(lm, "supports_gradient_checkpointing", False):
        yield
        return
    had_hook = hasattr(lm, "_require_grads_hook")
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        lm.activation_checkpointing_disable()
        if not had_hook and hasattr(lm, "_require_grads_hook"):  # transformers adds it for peft; take it away
            lm.disable_input_require_grads()


def loss_scaler(model: torch.nn.Module, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for float16 compute (``model.dtype=float16``, or float32 weights under 8/4-bit,
    whose activations run in float16): gradients below 6e-8 flush to zero in float16, so the loss is
    multiplied before backward, a step whose gradients overflowed is skipped and the factor adapts
    (what transformers' Trainer does with fp16=True). A no-op for float32 and bfloat16 (float32's range).
    """
    fp16 = any(p.dtype == torch.float16 for p in model.parameters())
    halves = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if halves:  # GradScaler cannot unscale float16 gradients, and float16 Adam moments underflow
        raise TrainingError(f"{len(halves)} trainable parameters (e.g. {halves[0]}) are float16; train float32 "
                            "adapters (peft's default) or use model.dtype=bfloat16.")
    return torch.amp.GradScaler(device.type, enabled=fp16)


def _check_factors(proximal_mu: float, lr_scale: float) -> None:
    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise TrainingError(f"proximal_mu={proximal_mu} must be a finite number >= 0.")
    if not (math.isfinite(lr_scale) and lr_scale >= 0):
        raise TrainingError(f"lr_scale={lr_scale} must be a finite number >= 0.")


# --------------------------------------------------------------------------- training


def train_local(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ExampleLike],
    titles: Titles,
    train_cfg: TrainSettings,
    seed: int,
    proximal_mu: float = 0.0,
    lr_scale: float = 1.0,
    progress: bool = True,
    domain: PromptDomain = GAMES,
    penalty: Callable[[], torch.Tensor | None] | None = None,
) -> TrainResult:
    """Train the model's trainable parameters (the LoRA of a PeftModel) on `examples`, in place.

    `lr_scale` multiplies ``train_cfg.lr`` (FELLRec's optional per-client factor); the
    schedule (warm-up, decay) is :func:`lr_factor` over this call's optimiser steps.
    `penalty` (e.g. `split.nopeek.NoPeek.take`) returns an extra loss term computed during the last
    forward, added to the objective (not to the reported loss); see :func:`optimizer_step`.
    """
    _check_factors(proximal_mu, lr_scale)
    if not examples:
        raise TrainingError("train_local got no examples; a client needs at least one training prompt.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters; wrap it with model.add_lora first.")
    device = model_device(model)
    features = encode_examples(tokenizer, examples, titles, train_cfg.max_length,
                               train_cfg.train_on_inputs, domain)
    collator = TrainCollator(pad_token_id_of(tokenizer))
    batches_per_epoch = math.ceil(len(features) / train_cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / train_cfg.grad_accum)
    total_steps = steps_per_epoch * train_cfg.local_epochs
    lr_factor(0, total_steps, train_cfg.warmup_steps, train_cfg.lr_schedule)  # bad settings fail here
    forward = fast_forward(model, train_cfg, device, features, collator, backward=True)
    prefix = forward.prefix_states([f.input_ids for f in features], train_cfg.batch_size)

    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr * lr_scale, weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, train_cfg.warmup_steps, train_cfg.lr_schedule))
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    shuffle = torch_generator(derive_seed(seed, "shuffle"))
    scaler = loss_scaler(model, device)

    was_training = model.training
    model.train()
    step_losses: list[float] = []
    bar = tqdm(total=total_steps, desc="local training", disable=not progress, leave=False)
    try:
        with seeded_torch(derive_seed(seed, "dropout")):
            for _ in range(train_cfg.local_epochs):
                order = torch.randperm(len(features), generator=shuffle).tolist()
                index_batches = _index_batches(features, train_cfg.batch_size, order, train_cfg.length_bucketing,
                                               shuffle)
                batches = _collate(features, index_batches, collator, prefix)
                for start in range(0, len(batches), train_cfg.grad_accum):
                    group = batches[start:start + train_cfg.grad_accum]
                    loss = optimizer_step(model, optimizer, group, params, anchors, proximal_mu, device,
                                          loss_fn=forward.loss_sum, scaler=scaler, penalty=penalty)
                    scheduler.step()
                    if loss is not None:
                        step_losses.append(loss)
                        bar.set_postfix(loss=f"{loss:.4f}")
                    bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    mean_loss = sum(step_losses) / len(step_losses) if step_losses else float("nan")
    return TrainResult(loss=mean_loss, steps=len(step_losses), num_examples=len(examples))


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    group: Sequence[dict[str, torch.Tensor]],
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    proximal_mu: float,
    device: torch.device,
    loss_fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, int]] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    penalty: Callable[[], torch.Tensor | None] | None = None,
) -> float | None:
    """One optimiser step over a group of micro-batches (collated by TrainCollator).

    Returns the step's token-mean loss, or None (and no step) when no token is labelled.
    `anchors` are the received values of `params`, used only when proximal_mu > 0.
    `loss_fn(batch) -> (loss sum, label count)` defaults to the model's full logits.
    `scaler` (:func:`loss_scaler`) scales the loss for float16 compute.
    `penalty()` is called after each micro-batch's forward; a term it returns (one per batch, e.g.
    NoPeek's alpha x dCor) is added to the objective averaged over the group's micro-batches.
    """
    tokens = sum(count_label_tokens(b["labels"]) for b in group)
    if tokens == 0:  # every label masked (possible with train_on_inputs=False and truncation)
        return None
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    optimizer.zero_grad(set_to_none=True)
    data_loss = torch.zeros((), dtype=torch.float64)
    for batch in group:
        if loss_fn is not None:
            loss_sum, _ = loss_fn(batch)
        else:
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        use_cache=False)
            loss_sum, _ = token_loss_sum(out.logits, batch["labels"])
        objective = loss_sum / tokens
        extra = penalty() if penalty is not None else None
        if extra is not None:
            objective = objective + extra / len(group)
        scaler.scale(objective).backward()
        data_loss = data_loss.to(loss_sum.device) + loss_sum.detach().double() / tokens  # no host sync per batch
    if proximal_mu > 0:
        scaler.scale(proximal_term(params, anchors, proximal_mu)).backward()
    scaler.step(optimizer)  # skipped when float16 gradients overflowed (the scale then shrinks)
    scaler.update()
    return float(data_loss)  # one host sync per optimiser step


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def eval_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ExampleLike],
    titles: Titles,
    train_cfg: TrainSettings,
    progress: bool = False,
    domain: PromptDomain = GAMES,
) -> float:
    """Mean next-token loss over every label token of `examples` (same labels as training)."""
    if not examples:
        raise TrainingError("eval_loss got no examples.")
    features = encode_examples(tokenizer, examples, titles, train_cfg.max_length,
                               train_cfg.train_on_inputs, domain)
    collator = TrainCollator(pad_token_id_of(tokenizer))
    order = sorted(range(len(features)), key=lambda i: len(features[i].input_ids))  # less padding
    device = model_device(model)
    forward = fast_forward(model, train_cfg, device, [features[i] for i in order], collator, backward=False)
    prefix = forward.prefix_states([f.input_ids for f in features], train_cfg.batch_size)
    index_batches = [order[start:start + train_cfg.batch_size] for start in range(0, len(order), train_cfg.batch_size)]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in tqdm(_collate(features, index_batches, collator, prefix), desc="eval loss",
                          disable=not progress, leave=False):
            loss_sum, n = forward.loss_sum(batch)
            total += loss_sum.item()
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise TrainingError("eval_loss: no label tokens (all masked); check train.max-length.")
    return total / count
