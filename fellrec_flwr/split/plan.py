"""Where a LLaMA-family model is cut between client and server ("flexible storage").

A model with L decoder layers is cut into three parts:

    client head  = token embedding + layers 0 .. front_k-1
    server body  = layers front_k .. L-back_k-1   (frozen, shared by all clients, no LoRA)
    client tail  = layers L-back_k .. L-1 + final norm + LM head

The client keeps a real `LlamaForCausalLM` whose server layers are replaced by a proxy
(see `fellrec_flwr.split.client.make_split_model`), so peft, `model(**batch).loss` and `generate` work
unchanged, and layer indices (hence LoRA key names and KV-cache slots) stay those of the
unsplit model.

This module holds the pure plan (`plan_split`), the server body module (`ServerBody`),
and loaders that read ONLY the tensors a side holds from a safetensors checkpoint, so a
client's memory is proportional to what it keeps.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import torch
from torch import nn

from fellrec_flwr.model.precision import cast_model

Part = Literal["client", "server"]

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_CLIENT_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")


class SplitError(ValueError):
    """An invalid cut, a model that cannot be split, or a checkpoint that lacks needed tensors."""


# ---------------------------------------------------------------------------
# The plan (pure)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitPlan:
    """Which decoder layers each side holds. Build with `plan_split` (it validates)."""

    num_layers: int
    front_k: int
    back_k: int

    @property
    def front_layers(self) -> range:
        return range(0, self.front_k)

    @property
    def server_layers(self) -> range:
        return range(self.front_k, self.num_layers - self.back_k)

    @property
    def back_layers(self) -> range:
        return range(self.num_layers - self.back_k, self.num_layers)

    @property
    def client_layers(self) -> list[int]:
        """Layer indices the client holds; also what LoRA's `layers_to_transform` should be."""
        return [*self.front_layers, *self.back_layers]

    def holds(self, key: str, part: Part) -> bool:
        """Does `part` hold the checkpoint tensor named `key` (Hugging Face Llama names)?"""
        match = _LAYER_KEY.match(key)
        if match:
            layer = int(match.group(1))
            return layer in (self.server_layers if part == "server" else self.client_layers)
        return part == "client" and key.startswith(_CLIENT_PREFIXES)

    def describe(self) -> str:
        s = self.server_layers
        return (f"client: embedding + layers 0..{self.front_k - 1}, layers {self.back_layers.start}.."
                f"{self.num_layers - 1} + norm + LM head; server: layers {s.start}..{s.stop - 1} "
                f"(of {self.num_layers})")


def plan_split(num_layers: int, front_k: int, back_k: int) -> SplitPlan:
    """Validate a cut: at least one layer on each client side and at least one on the server."""
    if num_layers < 3:
        raise SplitError(f"a model with {num_layers} decoder layers cannot be split: it needs at least 3 "
                         "(one front, one server, one back).")
    max_k = num_layers - 2
    for name, k in (("front_k", front_k), ("back_k", back_k)):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SplitError(f"{name}={k!r}: must be an integer >= 1 (the model has {num_layers} layers; "
                             f"valid range 1..{max_k}).")
    if front_k + back_k >= num_layers:
        raise SplitError(
            f"front_k={front_k} + back_k={back_k} = {front_k + back_k} leaves no layer for the server: the "
            f"model has {num_layers} layers, so front_k + back_k must be <= {num_layers - 1} "
            f"(each in 1..{max_k})."
        )
    return SplitPlan(num_layers, front_k, back_k)


def plan_for_model(model: Any, front_k: int, back_k: int) -> SplitPlan:
    return plan_split(_causal_lm(model).config.num_hidden_layers, front_k, back_k)


def plan_from_settings(split: Any, num_layers: int) -> SplitPlan | None:
    """The run config's cut (`split.*`, a SplitSettings) for a model of `num_layers` decoder layers,
    or None when split is off: where a run's plan comes from; the loaders keep it on what they build
    (`model.split_plan`, `ServerBody.plan`) and everything after takes it from there."""
    return plan_split(num_layers, split.front_k, split.back_k) if split.enabled else None


def loaded_plan(model: Any) -> SplitPlan:
    """The plan a client-only model was loaded with (`load_client_model` keeps it on the model)."""
    plan = getattr(_causal_lm(model), "split_plan", None)
    if plan is None:
        raise SplitError("this model was not loaded as a split client (no split_plan): load it with "
                         "fellrec_flwr.model.parts.load_client_part, or build a plan with plan_for_model.")
    return plan


# ---------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------


class PassThrough(nn.Module):
    """Stands in for a decoder layer the client does not hold: returns the hidden states as given.

    It has no parameters, so the client's state dict (and its LoRA keys) only name held layers.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class ServerLayersMissing(PassThrough):
    """Sits at layer `front_k` of a client-only model until `make_split_model` plugs in the service:
    running the model without it would silently skip the middle layers."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise SplitError("this client model has no server layers yet: connect it to the split service with "
                         "fellrec_flwr.split.client.make_split_model(model, plan, service_client).")


def _causal_lm(model: Any) -> nn.Module:
    """The `LlamaForCausalLM` inside a model (unwraps a peft PeftModel)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "model") and hasattr(inner.model, "layers") and hasattr(inner, "config")):
        raise SplitError(f"{type(inner).__name__} is not a LLaMA-family causal LM (expected .model.layers); "
                         "only LlamaForCausalLM-style models can be split.")
    return inner


def count_params(module: nn.Module) -> int:
    """Parameters with real storage (shared/tied tensors counted once, meta tensors skipped)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if p.device.type == "meta" or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _strip_peft(module: nn.Module) -> nn.Module:
    """Replace peft tuner layers (LoRA wrappers) by their frozen base layer, in place."""
    for name, child in list(module.named_children()):
        if hasattr(child, "get_base_layer") and child is not child.get_base_layer():
            setattr(module, name, child.get_base_layer())
        else:
            _strip_peft(child)
    return module


def attention_bias(key_mask: torch.Tensor | None, batch: int, q: int, past: int, dtype: torch.dtype,
                   device: torch.device | str, additive: bool = False) -> torch.Tensor:
    """The attention mask [B, 1, q, past+q] the server's layers use, built from first principles.

    Query i (cache slot past+i) may attend to key j iff j <= past+i (causal, by cache slot, as in
    the unsplit model) and `key_mask[b, j]` (not padding). Building it here, instead of asking
    transformers' masking utilities, keeps the wire protocol independent of how a transformers
    release builds or passes its masks (5.24 renamed `past_key_values` to `cache`, for one).
    Boolean (True = attend) for SDPA, as transformers builds it, so a query with no visible key
    (left padding) gets the same zero output as in the unsplit model; additive (0 / dtype min)
    for the eager implementation.
    """
    kv = past + q
    slots = torch.arange(kv, device=device)
    causal = slots[None, :] <= (torch.arange(q, device=device) + past)[:, None]  # [q, kv]
    allowed = causal[None, None].expand(batch, 1, q, kv)
    if key_mask is not None:
        if tuple(key_mask.shape) != (batch, kv):
            raise SplitError(f"key padding mask must be [{batch}, {kv}] (batch, past + new tokens); "
                             f"got {list(key_mask.shape)}.")
        allowed = allowed & key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    if not additive:
        return allowed.contiguous()
    bias = torch.zeros((batch, 1, q, kv), dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype activations should have in `module`: never an integer storage dtype.

    Under bitsandbytes 8/4-bit the weights are stored as int8/uint8 while the matmuls run in a
    floating dtype: take it from the quantisation config (`bnb_4bit_compute_dtype`), else from the
    floating-point parameters (norms, biases), else float16 on CUDA and float32 elsewhere.
    """
    config = getattr(module, "config", None)
    qcfg = getattr(config, "quantization_config", None)
    qdtype = getattr(qcfg, "bnb_4bit_compute_dtype", None) if qcfg is not None else None
    if isinstance(qcfg, dict):
        qdtype = qcfg.get("bnb_4bit_compute_dtype")
    if isinstance(qdtype, str):
        qdtype = getattr(torch, qdtype.replace("torch.", ""), None)
    if isinstance(qdtype, torch.dtype) and qdtype.is_floating_point:
        return qdtype
    floating = [p.dtype for p in module.parameters() if p.dtype.is_floating_point]
    if floating:
        return max(set(floating), key=floating.count)  # norms stay fp32 in some loads: take the majority
    params = list(module.parameters())
    on_cuda = bool(params) and params[0].device.type == "cuda"
    return torch.float16 if on_cuda else torch.float32


def cache_kwarg(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache by: `cache` (transformers >= 5.24) or
    `past_key_values` (earlier releases)."""
    import inspect

    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ServerBody(nn.Module):
    """The server's middle decoder layers, run as one block.

    Layers keep their original `layer_idx`, so a `DynamicCache(config=...)` holds the
    server's KV at the same slots as in the unsplit model. The attention mask is built here
    (`attention_bias`) from the key padding mask and the cache length the client states; the
    rotary embeddings come from the position ids that came over the wire.
    """

    def __init__(self, config: Any, plan: SplitPlan, layers: Iterable[nn.Module], rotary: nn.Module,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
            # layers built outside a PreTrainedModel get no attention backend, and flash/flex kernels
            # take other mask formats: the body builds a 4-D mask, which SDPA and eager understand.
            # (on the shared config object: the copied layers read their backend from it)
            config._attn_implementation = "sdpa"
        self.config = config
        self.plan = plan
        self.layers = nn.ModuleList(list(layers))
        self.rotary_emb = rotary
        if len(self.layers) != len(plan.server_layers):
            raise SplitError(f"server body got {len(self.layers)} layers; the plan needs {len(plan.server_layers)}.")
        self._cache_kwarg = cache_kwarg(self.layers[0])
        self._compute_dtype = compute_dtype  # None: follow the weights (see compute_dtype_of)
        # the probe as loaded: after 8/4-bit quantisation the weights are int8/packed uint8, which a
        # client's float checkpoint can never match (issue 22)
        self._loaded_probe = self._read_probe()
        self.requires_grad_(False)
        self.eval()

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations are cast to: floating even when the weights are quantised."""
        return self._compute_dtype or compute_dtype_of(self)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None, position_ids: torch.Tensor,
                cache: Any = None, past_len: int = 0) -> torch.Tensor:
        """Run the middle layers on `hidden` [B, q, H] whose tokens sit at cache slots
        past_len..past_len+q-1. `key_mask` [B, past_len+q] marks real (non-padding) keys;
        `cache` (a `new_cache()`) holds the first past_len slots and receives the new ones."""
        b, q = hidden.shape[:2]
        bias = attention_bias(key_mask, b, q, past_len, hidden.dtype, hidden.device,
                              additive=self.config._attn_implementation == "eager")
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            out = layer(hidden, attention_mask=bias, position_ids=position_ids,
                        position_embeddings=position_embeddings, use_cache=cache is not None,
                        **{self._cache_kwarg: cache})
            hidden = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
        return hidden

    def probe(self) -> dict[str, list[float]]:
        """A few weight values a client can compare with its own copy to detect a different model.

        Read from the weights while they are floating point; a quantised weight (int8, packed uint8)
        answers with the values it was loaded with, before quantisation."""
        return {**self._loaded_probe, **self._read_probe()}

    def _read_probe(self) -> dict[str, list[float]]:
        """The first 8 values of the probed weights that are floating point and materialised."""
        out = {}
        for i in (0, len(self.layers) - 1):
            layer = self.layers[i]
            for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
                try:
                    w = layer.get_parameter(name)
                except AttributeError:  # a stand-in layer without these weights (tests' fakes)
                    continue
                if not w.dtype.is_floating_point or w.device.type == "meta":
                    continue
                key = f"model.layers.{self.plan.server_layers[i]}.{name}"
                out[key] = [float(x) for x in w.detach().flatten()[:8].float().cpu()]
        return out


def build_server_body(model: Any, plan: SplitPlan) -> ServerBody:
    """The server body from a full model: a frozen, eval-mode COPY of the middle layers, LoRA removed.

    The given model is left untouched (it may still be used unsplit, e.g. in tests).
    """
    lm = _causal_lm(model)
    if lm.config.num_hidden_layers != plan.num_layers:
        raise SplitError(f"plan is for {plan.num_layers} layers; the model has {lm.config.num_hidden_layers}.")
    layers = []
    for i in plan.server_layers:
        layer = lm.model.layers[i]
        if isinstance(layer, PassThrough) or not hasattr(layer, "self_attn"):
            raise SplitError(f"layer {i} is not held by this model (already split?); build the server body "
                             "from a full model or load it with load_server_body().")
        layers.append(_strip_peft(copy.deepcopy(layer)))
    return ServerBody(lm.config, plan, layers, copy.deepcopy(lm.model.rotary_emb))


@dataclass
class SplitParts:
    plan: SplitPlan
    body: ServerBody


def split_model(model: Any, front_k: int, back_k: int) -> SplitParts:
    """Validate the cut for `model` and build the server body; the client side is made with
    `fellrec_flwr.split.client.make_split_model(model, parts.plan, service_client)`."""
    plan = plan_for_model(model, front_k, back_k)
    return SplitParts(plan, build_server_body(model, plan))


def server_layer_adapters(model: Any, plan: SplitPlan) -> list[str]:
    """Names of adapter (peft LoRA) modules living in server-held layers: must be empty to split,
    since the server body is shared by all clients and has no per-client weights."""
    lm = _causal_lm(model)
    names = []
    for i in plan.server_layers:
        names += [f"model.layers.{i}.{n}" for n, m in lm.model.layers[i].named_modules()
                  if hasattr(m, "get_base_layer") and m is not m.get_base_layer()]
    return names


# ---------------------------------------------------------------------------
# Checkpoints: read only what a side holds
# ---------------------------------------------------------------------------


def safetensors_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise SplitError(f"no .safetensors file in {path}; save the full model with save_full_model() "
                         "(or convert a GGUF file with model.resolve_checkpoint()).")
    return files


def _config_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def load_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    safetensors_files(path)  # a clear error first when there is no checkpoint at all
    try:
        config = AutoConfig.from_pretrained(str(_config_dir(Path(path))))
    except (OSError, ValueError) as err:
        raise SplitError(f"{path}: cannot read the model config ({err}); "
                         "save the model with save_full_model().") from None
    if getattr(config, "model_type", "") not in ("llama",):
        raise SplitError(f"{path}: model_type={config.model_type!r}; only LLaMA-architecture checkpoints "
                         "(model_type 'llama') can be split.")
    return config


def iter_held_tensors(path: str | Path, plan: SplitPlan, part: Part) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the tensors `part` holds, reading nothing else from disk."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                if plan.holds(key, part):
                    yield key, fh.get_tensor(key)


def held_bytes_on_disk(path: str | Path, plan: SplitPlan, part: Part) -> int:
    """Bytes of the tensors `part` holds in the checkpoint (from the headers; nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                if plan.holds(key, part):
                    sl = fh.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * _DTYPE_BYTES[sl.get_dtype()]
    return total


def checkpoint_probe(path: str | Path, names: Iterable[str], n: int = 8) -> dict[str, list[float]]:
    """The first `n` values of each named tensor, reading one row of it from the checkpoint: lets a
    client that holds no middle layer check that the service serves the same weights."""
    from safetensors import safe_open

    wanted, out = set(names), {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for key in wanted & set(fh.keys()):
                out[key] = [float(x) for x in fh.get_slice(key)[0:1].flatten()[:n].float()]
    return out


def check_service_probe(path: str | Path, probe: dict[str, list[float]], url: str) -> None:
    """Raise SplitError when the service's weight probe differs from this client's checkpoint."""
    mine = checkpoint_probe(path, probe)
    for name, values in probe.items():
        if name in mine and not torch.allclose(torch.tensor(mine[name]), torch.tensor(values), rtol=1e-2, atol=1e-3):
            raise SplitError(f"the split service at {url} holds different weights for {name} than this client's "
                             f"checkpoint {path}: it serves another model (or another tiny-model seed).")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise SplitError(f"dtype={dtype!r}: use float32, float16 or bfloat16.") from None


def _check_materialised(module: nn.Module, what: str) -> None:
    missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise SplitError(f"{what}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; "
                         "is it the same model (Hugging Face Llama tensor names)?")


def load_client_model(path: str | Path, front_k: int, back_k: int, dtype: str | torch.dtype | None = None,
                      device: str | torch.device = "cpu") -> nn.Module:
    """A `LlamaForCausalLM` holding only the client's tensors; server layers are `PassThrough`.

    The model is built on the meta device (no memory), the held tensors are read from the
    safetensors checkpoint and assigned, and the rotary buffers are rebuilt. Plug in the
    service with `fellrec_flwr.split.client.make_split_model(model, plan, service_client)`.
    """
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    path = Path(path)
    config = load_config(path)
    plan = plan_split(config.num_hidden_layers, front_k, back_k)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for i in plan.server_layers:
        model.model.layers[i] = ServerLayersMissing() if i == plan.front_k else PassThrough()
    state = dict(iter_held_tensors(path, plan, "client"))
    if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    model.load_state_dict({k: v for k, v in state.items() if v is not None}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # non-persistent buffers: recompute
    _check_materialised(model, f"client part of {path}")
    gen_file = _config_dir(path) / "generation_config.json"
    if gen_file.exists():
        model.generation_config = GenerationConfig.from_pretrained(str(_config_dir(path)))
    model.split_plan = plan  # a plain attribute: lets make_split_model check the plan matches
    model.split_checkpoint = str(path)  # where the middle layers' weights can be checked against the service
    return cast_model(model, device, _torch_dtype(dtype)).eval()  # rotary frequencies stay float32


def load_server_body(path: str | Path, front_k: int, back_k: int, dtype: str | torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> ServerBody:
    """The server body read from a safetensors checkpoint (only the middle layers' tensors)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    path = Path(path)
    config = load_config(path)
    plan = plan_split(config.num_hidden_layers, front_k, back_k)
    with torch.device("meta"):
        layers = {i: LlamaDecoderLayer(config, i) for i in plan.server_layers}
    per_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in plan.server_layers}
    for key, tensor in iter_held_tensors(path, plan, "server"):
        match = _LAYER_KEY.match(key)
        assert match is not None
        per_layer[int(match.group(1))][key[match.end():]] = tensor
    for i, layer in layers.items():
        try:
            layer.load_state_dict(per_layer[i], strict=True, assign=True)
        except RuntimeError as err:
            raise SplitError(f"{path}: layer {i} does not match the config: {err}") from err
    body = ServerBody(config, plan, [layers[i] for i in plan.server_layers], LlamaRotaryEmbedding(config=config))
    _check_materialised(body, f"server part of {path}")
    return cast_model(body, device, _torch_dtype(dtype)).eval()  # rotary frequencies stay float32


# ---------------------------------------------------------------------------
# Writing a full checkpoint (tiny model, GGUF conversion)
# ---------------------------------------------------------------------------


def save_full_model(model: Any, out_dir: str | Path, tokenizer: Any = None, overwrite: bool = True) -> Path:
    """Save a full LLaMA as safetensors (+ config, tokenizer) into `out_dir`, atomically.

    With ``overwrite=False`` an existing `out_dir` is kept and FileExistsError raised (processes
    racing to write the same deterministic model use the winner's, never replace a folder that
    another process may be reading).

    The state dict is copied into a plain `LlamaForCausalLM` first: transformers refuses to
    save a GGUF-loaded model, and a peft wrapper would add adapter names.
    """
    from transformers import LlamaForCausalLM

    from fellrec_flwr.atomic import atomic_dir

    lm = _causal_lm(model)
    if any(isinstance(layer, PassThrough) or not hasattr(layer, "self_attn") for layer in lm.model.layers):
        raise SplitError("save_full_model needs a full model; this one is already split.")
    has_peft = any(hasattr(m, "get_base_layer") for m in lm.modules())
    state = (_strip_peft(copy.deepcopy(lm)) if has_peft else lm).state_dict()
    with torch.device("meta"):
        plain = LlamaForCausalLM(copy.deepcopy(lm.config))
    plain.load_state_dict(state, strict=True, assign=True)  # shares the tensors: no copy
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.generation_config = lm.generation_config
    lm = plain
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        lm.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def default_work_dir() -> Path:
    from fellrec_flwr.paths import cache_root

    return cache_root()
