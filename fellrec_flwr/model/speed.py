"""Faster training forward passes on a CPU, each exact or switchable (bench/train_speed.py measures them).

- bf16 autocast, chosen per CPU and model: on an AVX2-only CPU it was measured 4x slower
  (issue 13), and even on a CPU with native bf16 instructions it is slower for the tiny model
  (its matrices are too small to pay for the casts) while 1.9x faster for SmolLM2
  (bench/train_speed.py, docs/results.md). So
  ``train.autocast='auto'`` uses bf16 only when the CPU has ``avx512_bf16`` or ``amx_bf16``
  (/proc/cpuinfo) AND one timed training step with bf16 beats one without by 10 %; the
  verdict is kept per (CPU, model architecture, trainable-parameter count) in
  ``<FELLREC_CACHE>/autocast.json``, so a machine measures once.
- The LM head only where a loss is taken: the vocabulary projection (49k x 576 for SmolLM2)
  and its softmax are computed only for positions whose next token is labelled, instead of
  for every position of the padded batch. Same loss up to float rounding. With
  ``train.loss-chunk-mb`` the loss is taken over blocks of the vocabulary with a running
  log-sum-exp, so the logits (4 x 128 positions x 49k x float32 = 100 MB, and their softmax and
  gradient as much again each) and a bf16 copy of the head never exist whole: a memory bound for
  a client, with no extra matrix product when the head is frozen.
- The frozen prefix's activations cached: when LoRA (and every other trainable or changing
  weight) sits in the last layers only (``lora.layers``), the hidden states entering the
  first adapted layer never change while the adapter trains. They are computed once per
  example (kept across epochs and rounds, keyed by the prefix weights' version counters)
  and training runs only the top layers.

All three need a causal LM whose decoder has ``.layers`` and ``.norm`` and whose logits are
the plain output projection of the last hidden state (LLaMA, Mistral, Qwen2, the tiny model);
other models take the ordinary ``model(...).logits`` path.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fellrec_flwr.data.collate import IGNORE_INDEX

AUTOCAST_CHOICES = ("auto", "bf16", "off")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Config entries that change logits beyond the plain output projection: use model(...).logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


# --------------------------------------------------------------------------- autocast


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (the ``flags`` line of /proc/cpuinfo); empty when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    return any(flag in cpu_flags(cpuinfo) for flag in NATIVE_BF16_FLAGS)


def autocast_dtype(choice: str, device: torch.device, cpuinfo: str | None = None) -> torch.dtype | None:
    """The autocast dtype for ``train.autocast`` on `device`, or None for no autocast.

    'auto' turns bf16 on only on a CPU with native bf16 instructions; on a GPU this answers None and
    :meth:`AutocastChooser.choose`, which sees the model, decides (:func:`cuda_autocast`).
    """
    if choice not in AUTOCAST_CHOICES:
        raise ValueError(f"train.autocast={choice!r} is not one of {', '.join(AUTOCAST_CHOICES)}.")
    if choice == "off":
        return None
    if choice == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16(cpuinfo) else None


AUTO_MARGIN = 0.9  # bf16 must take < 90 % of the fp32 step time to be chosen


def autocast_probe_key(model: nn.Module, cpuinfo: str | None = None) -> str:
    """What the bf16-vs-fp32 verdict depends on: the CPU, the architecture and what trains."""
    import hashlib

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    arch = config.to_json_string() if hasattr(config, "to_json_string") else type(lm).__name__
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cpu = next((line for line in (cpuinfo or _read_cpuinfo()).splitlines() if line.startswith("model name")), "")
    dtype = str(next(model.parameters()).dtype)
    return hashlib.sha256(f"{cpu}|{arch}|{trainable}|{dtype}|{torch.__version__}".encode()).hexdigest()[:16]


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def time_call(fn: Any, repeats: int = 2) -> float:
    """Least CPU time of `repeats` calls, after one untimed call (first-call allocations).

    CPU time of this process, not wall time: on cores shared with other jobs the wall clock
    measures the neighbours.
    """
    import time

    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


class AutocastChooser:
    """'auto' autocast: the CPU flags, then a one-time timing of the caller's own step."""

    def __init__(self, verdict_file: Path | None) -> None:
        self.verdict_file = verdict_file
        self.memory: dict[str, bool] = {}

    def _load(self) -> dict[str, bool]:
        if self.verdict_file is None or not self.verdict_file.exists():
            return {}
        try:
            import json

            return {str(k): bool(v) for k, v in json.loads(self.verdict_file.read_text()).items()}
        except (OSError, ValueError):
            return {}  # a damaged file only costs a new measurement

    def _store(self, key: str, use_bf16: bool) -> None:
        self.memory[key] = use_bf16
        if self.verdict_file is None:
            return
        from fellrec_flwr.atomic import atomic_write_json

        try:
            atomic_write_json(self.verdict_file, {**self._load(), key: use_bf16})
        except OSError:
            pass  # read-only cache: the verdict stays in this process

    def choose(self, choice: str, device: torch.device, model: nn.Module,
               step: Any, cpuinfo: str | None = None) -> torch.dtype | None:
        """The autocast dtype; for 'auto' on a bf16-capable CPU, `step(dtype)` is timed both ways once;
        on a GPU, bf16 for float32 weights where the GPU has bf16 (:func:`cuda_autocast`)."""
        if choice == "auto" and device.type == "cuda":
            return cuda_autocast(model)
        if choice != "auto" or device.type != "cpu":
            return autocast_dtype(choice, device, cpuinfo)
        if not cpu_has_native_bf16(cpuinfo):
            return None
        key = autocast_probe_key(model, cpuinfo)
        if key not in self.memory:
            known = self._load()
            if key in known:
                self.memory[key] = known[key]
            else:
                with torch.random.fork_rng(devices=[]):  # the timing must not shift the seeded dropout stream
                    fp32 = time_call(lambda: step(None))
                    bf16 = time_call(lambda: step(torch.bfloat16))
                self._store(key, bf16 < AUTO_MARGIN * fp32)
                logging.getLogger(__name__).info("autocast auto: fp32 step %.3f s, bf16 %.3f s -> %s", fp32, bf16,
                                                 "bf16" if self.memory[key] else "off")
        return torch.bfloat16 if self.memory[key] else None


def cuda_autocast(model: nn.Module) -> torch.dtype | None:
    """'auto' on a GPU: float32 weights train under bf16 autocast where the GPU has bf16 (Ampere and
    later: the tensor cores' rate, float32 master weights); bf16/fp16 weights already compute in 16 bits."""
    weights = {p.dtype for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    if weights and weights <= {torch.float32} and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return None


def default_chooser() -> AutocastChooser:
    global _CHOOSER
    if _CHOOSER is None:
        from fellrec_flwr.paths import cache_root

        _CHOOSER = AutocastChooser(cache_root() / "autocast.json")
    return _CHOOSER


_CHOOSER: AutocastChooser | None = None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- pure pieces


def labelled_head_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                       chunk_bytes: int = 0) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies, projecting only the hidden states that predict a label.

    Equal to ``token_loss_sum(head(hidden), labels)``: position t predicts labels[t+1]. With
    `chunk_bytes` > 0 and float32 logits larger than that, the loss is taken in pieces of about
    `chunk_bytes` (:func:`chunked_head_loss`): the [positions, vocabulary] logits never exist whole.
    """
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    rows, wanted = hidden[:, :-1][keep], targets[keep]
    if 0 < chunk_bytes < 4 * rows.shape[0] * head.out_features:
        return chunked_head_loss(rows, wanted, head, chunk_bytes), int(keep.sum())
    logits = head(rows).float()
    return F.cross_entropy(logits, wanted, reduction="sum"), int(keep.sum())


MIN_VOCAB_BLOCK = 256  # narrower blocks would make the head's matrix products inefficient


def vocab_block(rows: int, chunk_bytes: int, vocab: int) -> int:
    """Vocabulary entries per block so that a block's float32 logits for `rows` positions take
    about `chunk_bytes` (SmolLM2, 4 x 128 positions, 12 MB: 6,144 of its 49,152 entries)."""
    return min(vocab, max(MIN_VOCAB_BLOCK, chunk_bytes // (4 * max(1, rows))))


def _matmul_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives a linear layer here, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _blocked_head_loss(rows: torch.Tensor, targets: torch.Tensor, head: nn.Linear, block: int,
                       with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy sum over vocabulary blocks with a running log-sum-exp (no autograd), and, if
    asked, its gradient w.r.t. `rows`: sum_v softmax_v W_v - W_target, accumulated block by block.

    Each block is computed as the head computes it (autocast included: the block of the weight is
    cast, never the whole matrix); the gradient's products run in the same dtype as autograd's.
    """
    weight, bias = head.weight, head.bias
    n = rows.shape[0]
    running_max = rows.new_full((n,), float("-inf"), dtype=torch.float32)
    sum_exp = rows.new_zeros((n,), dtype=torch.float32)
    target_logit = rows.new_zeros((n,), dtype=torch.float32)
    grad = rows.new_zeros(rows.shape, dtype=torch.float32) if with_grad else None
    low = _matmul_dtype(rows.device)
    for start in range(0, weight.shape[0], block):
        w = weight[start:start + block]
        logits = F.linear(rows, w, None if bias is None else bias[start:start + block]).float()
        inside = (targets >= start) & (targets < start + w.shape[0])
        target_logit[inside] = logits[inside, targets[inside] - start]
        new_max = torch.maximum(running_max, logits.max(dim=1).values)
        rescale = torch.exp(running_max - new_max)
        probs = torch.exp(logits - new_max[:, None])
        del logits
        sum_exp = sum_exp * rescale + probs.sum(dim=1)
        if grad is not None:
            product = probs.to(low) @ w.to(low) if low is not None else probs @ w.to(probs.dtype)
            grad = grad * rescale[:, None] + product.float()
        running_max = new_max
    loss = (running_max + torch.log(sum_exp) - target_logit).sum()
    if grad is None:
        return loss, None
    picked = weight[targets]
    picked = picked.to(low).float() if low is not None else picked.float()
    return loss, (grad / sum_exp[:, None] - picked).to(rows.dtype)


class _FrozenHeadLoss(torch.autograd.Function):
    """Cross-entropy through a frozen linear head, its gradient w.r.t. the rows taken in the forward
    pass block by block (:func:`_blocked_head_loss`); what is kept for backward is that gradient
    ([positions, hidden], small). Backward scales it by the incoming (scalar) gradient."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, targets: torch.Tensor, head: nn.Linear, block: int) -> torch.Tensor:
        loss, grad = _blocked_head_loss(rows.detach(), targets, head, block, with_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def _rows_loss(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def chunked_head_loss(rows: torch.Tensor, targets: torch.Tensor, head: nn.Linear, chunk_bytes: int) -> torch.Tensor:
    """``cross_entropy(head(rows).float(), targets, reduction='sum')`` in pieces of about `chunk_bytes`.

    Same value and gradients up to float rounding. A frozen head (LoRA elsewhere) is taken over
    vocabulary blocks with a running log-sum-exp: neither the whole logits nor a whole cast copy
    of the weight (under autocast) ever exists, and no matrix product is added. A head with
    trainable weights is taken over chunks of positions, each recomputed in the backward pass
    (activation checkpointing) so the weights get their gradient.
    """
    trainable_head = any(p.requires_grad for p in head.parameters())
    needs_grad = torch.is_grad_enabled() and (rows.requires_grad or trainable_head)
    if not trainable_head:
        block = vocab_block(rows.shape[0], chunk_bytes, head.out_features)
        if not needs_grad:
            return _blocked_head_loss(rows, targets, head, block, with_grad=False)[0]
        return _FrozenHeadLoss.apply(rows, targets, head, block)
    from torch.utils.checkpoint import checkpoint

    chunk = max(1, chunk_bytes // (4 * head.out_features))
    parts = [checkpoint(_rows_loss, head, rows[start:start + chunk], targets[start:start + chunk],
                        use_reentrant=False) for start in range(0, rows.shape[0], chunk)]
    return torch.stack(parts).sum()


def pad_hidden(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Right-pad per-example hidden states [len_i, d] with zeros to one [batch, max_len, d]."""
    width = max(s.shape[0] for s in states)
    out = states[0].new_zeros((len(states), width, states[0].shape[1]))
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
    return out


# --------------------------------------------------------------------------- the model's parts


@dataclass(frozen=True)
class DecoderParts:
    lm: nn.Module  # the causal LM (inside a PeftModel)
    decoder: nn.Module  # its transformer: embed_tokens, layers, norm
    head: nn.Module  # the output projection


def decoder_parts(model: nn.Module) -> DecoderParts | None:
    """The decoder and head of a (Peft-wrapped) causal LM, or None when logits are not plain head(hidden)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(lm, "model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return None
    if not isinstance(getattr(decoder, "norm", None), nn.Module) or not isinstance(head, nn.Linear):
        return None
    config = getattr(lm, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return DecoderParts(lm, decoder, head)


def first_changing_layer(parts: DecoderParts) -> int:
    """Index of the first decoder layer holding a trainable or LoRA weight; 0 when anything
    outside the layers trains (then no prefix is frozen). len(layers) when nothing trains."""
    layers = list(parts.decoder.layers)
    in_layers: set[int] = set()
    first = len(layers)
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            in_layers.add(id(p))
            if i < first and (p.requires_grad or "lora_" in name):
                first = i
    outside = any(p.requires_grad for p in parts.lm.parameters() if id(p) not in in_layers)
    return 0 if outside else first


@contextlib.contextmanager
def layer_range(decoder: nn.Module, start: int, stop: int, final_norm: bool = True) -> Iterator[None]:
    """Let the decoder's own forward run only layers[start:stop] (and skip the final norm if asked)."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers = layers
        decoder.norm = norm


# --------------------------------------------------------------------------- prefix cache


class PrefixCache:
    """Hidden states entering layer `start`, per token sequence, for one decoder.

    Valid while the prefix's weights are unchanged: the key holds their version counters,
    which every in-place update (optimiser step, load_state_dict) advances.
    """

    def __init__(self) -> None:
        self.key: tuple = ()
        self.items: dict[tuple[int, ...], torch.Tensor] = {}
        self.bytes = 0

    def reset(self, key: tuple) -> None:
        self.key, self.items, self.bytes = key, {}, 0


# decoder -> autocast dtype -> cache (a full-precision evaluation does not evict bf16 training states)
_CACHES: "weakref.WeakKeyDictionary[nn.Module, dict[str, PrefixCache]]" = weakref.WeakKeyDictionary()


def hidden_dtype(decoder: nn.Module) -> torch.dtype:
    """The dtype of the hidden states between the decoder's layers: that of its token embeddings
    (float32 weights under autocast keep a float32 residual stream; bf16/fp16 weights, bf16/fp16).
    Cached states fed back as ``inputs_embeds`` must have it, or a bf16 layer meets float32 input."""
    return decoder.embed_tokens.weight.dtype


def _state_bytes(decoder: nn.Module) -> int:
    return torch.empty((), dtype=hidden_dtype(decoder)).element_size()


def _prefix_key(parts: DecoderParts, start: int, dtype: torch.dtype | None) -> tuple:
    prefix = [parts.decoder.embed_tokens] + list(parts.decoder.layers)[:start]
    versions = tuple(p._version for m in prefix for p in m.parameters())
    return (start, str(dtype), versions)


# --------------------------------------------------------------------------- the forward


class FastForward:
    """Loss sum and label count of a collated batch, by the fastest path the settings allow."""

    def __init__(self, model: nn.Module, device: torch.device, labelled_logits_only: bool = True,
                 prefix_cache_mb: float = 0.0, autocast_to: torch.dtype | None = None,
                 loss_chunk_mb: float = 0.0) -> None:
        self.model, self.device, self.dtype = model, device, autocast_to
        self.parts = decoder_parts(model) if (labelled_logits_only or prefix_cache_mb > 0) else None
        self.head_only = labelled_logits_only and self.parts is not None
        # bytes of float32 logits at a time (labelled-logits path only): bounds the loss's memory
        self.chunk_bytes = int(loss_chunk_mb * 2**20) if self.head_only else 0
        self.prefix_start = self._prefix_start(prefix_cache_mb)
        self.cache_bytes = int(prefix_cache_mb * 2**20)

    def _prefix_start(self, prefix_cache_mb: float) -> int:
        if prefix_cache_mb <= 0 or self.parts is None:
            return 0
        lm = self.parts.lm
        if getattr(lm, "split_plan", None) is not None:  # server-held layers: not ours to cache
            return 0
        config = getattr(lm, "config", None)
        if getattr(config, "attention_dropout", 0.0) or getattr(config, "hidden_dropout", 0.0):
            return 0  # the prefix would be random in training mode
        start = first_changing_layer(self.parts)
        return start if 0 < start < len(self.parts.decoder.layers) else 0

    # -- prefix --------------------------------------------------------------------------

    def prefix_states(self, sequences: Sequence[Sequence[int]], batch_size: int) -> list[torch.Tensor] | None:
        """Cached hidden states entering the first adapted layer, one [len, d] per sequence;
        None when there is no frozen prefix or they would not fit in prefix-cache-mb."""
        if not self.prefix_start:
            return None
        parts = self.parts
        assert parts is not None
        cache = _CACHES.setdefault(parts.decoder, {}).setdefault(str(self.dtype), PrefixCache())
        key = _prefix_key(parts, self.prefix_start, self.dtype)
        if cache.key != key:
            cache.reset(key)
        missing = list(dict.fromkeys(tuple(s) for s in sequences if tuple(s) not in cache.items))
        need = sum(len(s) for s in missing) * parts.head.in_features * _state_bytes(parts.decoder)
        if need > self.cache_bytes:
            _warn_once(f"prefix cache: {need / 2**20:.0f} MB needed > train.prefix-cache-mb="
                       f"{self.cache_bytes / 2**20:.0f}; training runs the whole model instead.")
            return None
        if cache.bytes + need > self.cache_bytes:
            cache.reset(key)  # make room: another client's or round's examples
        self._fill(cache, missing, batch_size)
        return [cache.items[tuple(s)] for s in sequences]

    @torch.no_grad()
    def _fill(self, cache: PrefixCache, sequences: list[tuple[int, ...]], batch_size: int) -> None:
        parts = self.parts
        assert parts is not None
        order = sorted(sequences, key=len)
        was_training = parts.decoder.training
        parts.decoder.eval()
        try:
            with layer_range(parts.decoder, 0, self.prefix_start, final_norm=False), autocast(self.device, self.dtype):
                for start in range(0, len(order), batch_size):
                    chunk = order[start:start + batch_size]
                    width = max(len(s) for s in chunk)
                    ids = torch.tensor([list(s) + [0] * (width - len(s)) for s in chunk], device=self.device)
                    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=self.device)
                    hidden = parts.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    # kept in the dtype the layers take (bf16/fp16 weights take bf16/fp16 inputs), in host
                    # memory; one copy per batch, not one host sync per example
                    hidden = hidden.to(device="cpu", dtype=hidden_dtype(parts.decoder))
                    for s, h in zip(chunk, hidden):  # right padding: real positions never saw a pad
                        state = h[: len(s)].clone()
                        cache.items[s] = state
                        cache.bytes += state.numel() * state.element_size()
        finally:
            parts.decoder.train(was_training)

    # -- loss ----------------------------------------------------------------------------

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        mask = batch["attention_mask"].to(self.device)
        with autocast(self.device, self.dtype):
            if "prefix_hidden" in batch:
                parts = self.parts
                assert parts is not None
                with layer_range(parts.decoder, self.prefix_start, len(parts.decoder.layers)):
                    states = batch["prefix_hidden"].to(self.device, dtype=hidden_dtype(parts.decoder))
                    hidden = parts.decoder(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state
                return self._head_loss(hidden, labels)
            if self.head_only:
                assert self.parts is not None
                hidden = self.parts.decoder(input_ids=batch["input_ids"].to(self.device), attention_mask=mask,
                                            use_cache=False).last_hidden_state
                return self._head_loss(hidden, labels)
            logits = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask,
                                use_cache=False).logits
            return full_logits_loss(logits, labels)

    def _head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        assert self.parts is not None
        if self.head_only:
            return labelled_head_loss(hidden, labels, self.parts.head, self.chunk_bytes)
        return full_logits_loss(self.parts.head(hidden), labels)


def full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over labelled positions from full logits, and their count."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((labels[:, 1:] != IGNORE_INDEX).sum())


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger(__name__).warning(message)


def describe(forward: FastForward) -> dict[str, Any]:
    """What the forward does, for logs and the benchmark."""
    return {"autocast": str(forward.dtype).replace("torch.", "") if forward.dtype else "off",
            "labelled_logits_only": forward.head_only, "prefix_layers_cached": forward.prefix_start,
            "loss_chunk_mb": forward.chunk_bytes / 2**20}
