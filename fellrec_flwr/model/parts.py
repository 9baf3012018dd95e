"""Load only the part of the base model a process runs (flexible storage), from the checkpoint.

One code path for the split ClientApp, the split service and the benchmarks:

    checkpoint_for(model_cfg, titles, work_dir)   -> a folder of safetensors for model.name
    load_client_part(...)  -> (client-only LlamaForCausalLM, tokenizer)   embed + layers [0,k) +
                              [L-k, L) + norm + LM head (+ rotary); server layers hold no tensor
    load_server_part(...)  -> ServerBody                                 layers [k, L-k) + rotary
    base_config(...)       -> the model config, no weights
    initial_lora_state(...) -> the seeded LoRA initialisation, from a meta-device skeleton

The model skeleton is built on the meta device (no memory) and only the tensors a part holds
are read from the safetensors files (`split.load_client_model` / `split.load_server_body`), so a
process's memory follows what it keeps, never the full model.

Model sources: a Hugging Face id or folder with safetensors weights is read in place; a GGUF
file is de-quantised once into a safetensors copy (`model.resolve_checkpoint`); the `tiny`
model is generated once (fixed seed + public warm-up) and saved next to the prepared data.
Those two one-off conversions build the full model once per machine — a preparation step,
which `python -m fellrec_flwr.model.parts prepare` runs ahead of time; after it no process
constructs the full model.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from fellrec_flwr.config import LoraSettings, ModelConfig
from fellrec_flwr.model.loading import (
    TINY_BASE_SEED, ModelLoadError, _ensure_pad_token, _offline, _tokenizer_texts, compute_dtype_for, find_gguf,
    quantization_config, resolve_checkpoint, resolve_device, resolve_dtype,
)
from fellrec_flwr.split.plan import ServerBody, load_client_model, load_server_body

Titles = Mapping[int, str] | Sequence[str]
Part = Literal["client", "server"]


# ---------------------------------------------------------------------------
# Where the weights are
# ---------------------------------------------------------------------------


def tiny_checkpoint_dir(model_cfg: ModelConfig, titles: Titles, work_dir: str | Path) -> Path:
    """The saved full tiny model: named by everything its weights depend on (tokenizer texts, shape,
    warm-up prompts and recipe, base seed), like `model._load_tiny`'s own caches."""
    from fellrec_flwr.model import tiny

    texts = _tokenizer_texts(titles)
    fingerprint = hashlib.sha256("\n".join([str(model_cfg.tiny_vocab), *texts]).encode()).hexdigest()[:12]
    shape = f"{model_cfg.tiny_hidden}x{model_cfg.tiny_layers}x{model_cfg.tiny_heads}"
    warm = model_cfg.tiny_pretrain_prompts if isinstance(titles, Mapping) else 0
    return Path(work_dir) / f"tiny-full-{fingerprint}-{shape}-p{warm}-{tiny.PRETRAIN_RECIPE}-s{TINY_BASE_SEED}"


def checkpoint_for(model_cfg: ModelConfig, titles: Titles, work_dir: str | Path) -> Path:
    """A folder of safetensors weights (+ config, tokenizer) for `model_cfg.name`, prepared once."""
    name = model_cfg.name.strip()
    if not name:
        raise ModelLoadError("model.name is empty; use 'tiny', a .gguf file, a local folder or a Hugging Face id.")
    if name == "tiny":
        folder = tiny_checkpoint_dir(model_cfg, titles, work_dir)
        if not (folder / "config.json").exists():
            _save_tiny(model_cfg, titles, Path(work_dir), folder)
        return folder
    path = Path(name).expanduser()
    if find_gguf(name) is not None or path.exists():
        return resolve_checkpoint(name, work_dir)
    if name.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"model.name={name!r}: no such file or folder.")
    return _hub_snapshot(name)


def _save_tiny(model_cfg: ModelConfig, titles: Titles, work_dir: Path, folder: Path) -> None:
    """Generate the tiny model once (the preparation step) and save it as safetensors."""
    from fellrec_flwr.model.loading import _load_tiny
    from fellrec_flwr.split.plan import save_full_model

    model, tokenizer = _load_tiny(model_cfg, titles, work_dir)
    _ensure_pad_token(tokenizer, model)
    try:
        save_full_model(model, folder, tokenizer, overwrite=False)
    except FileExistsError:  # another client process on this machine saved the same model first
        pass


def _hub_snapshot(name: str) -> Path:
    """The local snapshot folder of a Hugging Face id (downloaded unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=_offline(),
                                        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # noqa: BLE001 -- offline miss, unknown id, no network: one clear message
        raise ModelLoadError(f"cannot find model.name={name!r} locally{' (offline)' if _offline() else ''} "
                             f"({type(err).__name__}); use a local folder with safetensors, a .gguf file, "
                             "or 'tiny'.") from err
    return resolve_checkpoint(folder, folder)  # checks it has safetensors weights


# ---------------------------------------------------------------------------
# Config and tokenizer (no weights)
# ---------------------------------------------------------------------------


def base_config(model_cfg: ModelConfig, titles: Titles, work_dir: str | Path) -> Any:
    """The model config without loading any weight (for the LoRA shapes a server needs)."""
    from transformers import AutoConfig

    name = model_cfg.name.strip()
    if name == "tiny":
        from fellrec_flwr.model import tiny

        folder = tiny_checkpoint_dir(model_cfg, titles, work_dir)
        if (folder / "config.json").exists():
            return AutoConfig.from_pretrained(str(folder))
        texts = _tokenizer_texts(titles)  # the tokenizer decides the vocabulary size (cheap, cached)
        fingerprint = hashlib.sha256("\n".join([str(model_cfg.tiny_vocab), *texts]).encode()).hexdigest()[:12]
        tok = tiny.train_tokenizer(texts, model_cfg.tiny_vocab, Path(work_dir) / f"tokenizer-{fingerprint}")
        config = tiny.tiny_config(len(tok), model_cfg.tiny_hidden, model_cfg.tiny_layers, model_cfg.tiny_heads)
        config.bos_token_id, config.eos_token_id, config.pad_token_id = (tok.bos_token_id, tok.eos_token_id,
                                                                         tok.pad_token_id)
        return config
    gguf = find_gguf(name) if name else None
    if gguf is not None:
        from fellrec_flwr.model.loading import converted_gguf_dir

        converted = converted_gguf_dir(gguf, work_dir)
        if (converted / "config.json").exists():
            return AutoConfig.from_pretrained(str(converted))
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # metadata only
    return AutoConfig.from_pretrained(str(checkpoint_for(model_cfg, titles, work_dir)))


def load_tokenizer(model_cfg: ModelConfig, folder: Path) -> Any:
    """The tokenizer saved with the checkpoint: left padding, a pad token (as `load_base_model`)."""
    if model_cfg.name.strip() == "tiny":
        from fellrec_flwr.model import tiny

        tokenizer = tiny.load_tokenizer(folder)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer


# ---------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------


def load_client_part(model_cfg: ModelConfig, titles: Titles, work_dir: str | Path, front_k: int,
                     back_k: int) -> tuple[nn.Module, Any]:
    """The client's part only (embedding, first front_k and last back_k layers, norm, head) and the
    tokenizer; the server layers are placeholders until `fellrec_flwr.split.client.make_split_model`. Under
    8/4-bit the held decoder layers are quantised and the rest is in the compute dtype."""
    device, _, quant = settings(model_cfg)
    folder = checkpoint_for(model_cfg, titles, work_dir)
    model = load_client_model(folder, front_k, back_k, dtype=compute_dtype_for(model_cfg),
                              device="cpu" if quant is not None else device)  # bnb quantises on its way to the GPU
    if quant is not None:
        quantize_decoder_linears(model, quant, device)
    tokenizer = load_tokenizer(model_cfg, folder)
    _ensure_pad_token(tokenizer, model)
    return model, tokenizer


def load_server_part(model_cfg: ModelConfig, folder: str | Path, front_k: int, back_k: int) -> ServerBody:
    """The server's middle layers only, from the checkpoint `folder` (`checkpoint_for`), with the
    compute dtype set from the config (never int8). No data is needed: a service finds its weights
    from the folder it is given."""
    device, _, quant = settings(model_cfg)
    body = load_server_body(folder, front_k, back_k, dtype=compute_dtype_for(model_cfg),
                            device="cpu" if quant is not None else device)
    if quant is not None:
        quantize_decoder_linears(body, quant, device)
    body._compute_dtype = compute_dtype_for(model_cfg)
    return body


def settings(model_cfg: ModelConfig) -> tuple[torch.device, torch.dtype, Any]:
    """(device, dtype, BitsAndBytesConfig or None) with the same checks as `load_base_model`."""
    device = resolve_device(model_cfg.device)
    return device, resolve_dtype(model_cfg.dtype), quantization_config(model_cfg, device)


def quantize_decoder_linears(module: nn.Module, quant: Any, device: torch.device) -> nn.Module:
    """Replace the decoder layers' nn.Linear by bitsandbytes 8/4-bit layers on `device`, in place.

    Only the held decoder layers are touched (embedding and LM head stay in floating point, as
    transformers' own bitsandbytes loading leaves them); moving a bnb layer to CUDA quantises it.
    """
    import bitsandbytes as bnb

    from fellrec_flwr.model.loading import quantized_device_map

    index = quantized_device_map(device)[""]
    target = torch.device("cuda", index)
    layers = module.layers if hasattr(module, "layers") and not hasattr(module, "model") else module.model.layers
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _bnb_linear(bnb, child, quant).to(target))
    module.to(target)  # norms, rotary buffers, embedding: on the same GPU
    config = getattr(module, "config", None)
    if config is not None:
        config.quantization_config = quant
    flag = "is_loaded_in_8bit" if quant.load_in_8bit else "is_loaded_in_4bit"
    setattr(module, flag, True)  # what peft's prepare_model_for_kbit_training and is_quantized read
    return module


def _bnb_linear(bnb: Any, linear: nn.Linear, quant: Any) -> nn.Module:
    bias = linear.bias is not None
    if quant.load_in_8bit:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=quant.llm_int8_threshold)
        new.weight = bnb.nn.Int8Params(linear.weight.data.to(torch.float16), requires_grad=False,
                                       has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                compute_dtype=quant.bnb_4bit_compute_dtype, quant_type=quant.bnb_4bit_quant_type)
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=quant.bnb_4bit_quant_type)
    if bias:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new


# ---------------------------------------------------------------------------
# The initial LoRA, without the weights
# ---------------------------------------------------------------------------


def initial_lora_state(config: Any, lora: LoraSettings, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """The LoRA initialisation `add_lora(real model, lora, seed)` gives, from the config alone.

    The base model is a meta-device skeleton; every linear gets a zero-strided stand-in weight
    (one element of memory) so that peft keeps the adapters on the CPU, draws them under the
    same seed in the same module order, and casts them to the weights' `dtype` as for the real
    model. Pass float32 for an 8/4-bit model (peft keeps adapters in float32 on integer weights).
    """
    from transformers import AutoModelForCausalLM

    from fellrec_flwr.model.lora_state import get_lora_state
    from fellrec_flwr.model.loading import add_lora

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    for module in skeleton.modules():
        if isinstance(module, nn.Linear):
            stand_in = torch.zeros((), dtype=dtype).expand(module.out_features, module.in_features)
            module.weight = nn.Parameter(stand_in, requires_grad=False)
    return get_lora_state(add_lora(skeleton, lora, seed=seed))


def lora_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype peft gives the adapters: the weights' dtype, float32 under 8/4-bit."""
    return torch.float32 if model_cfg.quantization in ("8bit", "4bit") else resolve_dtype(model_cfg.dtype)


def held_parameter_names(module: nn.Module) -> list[str]:
    """Names of parameters with real storage (not meta) — what a process holds."""
    return [n for n, p in module.named_parameters() if p.device.type != "meta"]


# ---------------------------------------------------------------------------
# Preparation command
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """python -m fellrec_flwr.model.parts prepare --run-config "model.name=... data.dataset=..." """
    p = argparse.ArgumentParser(prog="python -m fellrec_flwr.model.parts",
                                description="Prepare, once, the safetensors checkpoint a run's partial loads read "
                                            "(GGUF de-quantised, tiny generated), where the run will look for it.")
    p.add_argument("command", choices=["prepare"])
    p.add_argument("--run-config", default="", help='the run\'s settings, as for flwr run, e.g. "model.name=x.gguf"')
    args = p.parse_args(argv)
    from flwr.common.config import parse_config_args

    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.data.on_demand import prepare_folder
    from fellrec_flwr.data.prepared import PreparedData
    from fellrec_flwr.paths import cache_root

    cfg = from_run_config(parse_config_args([args.run_config]) if args.run_config else {})
    # as runtime.prepare_data: converted models live in the prepared-data folder, where every process looks
    data = PreparedData.load(prepare_folder(cfg.data, cache_root(), seed=cfg.seed))
    print(checkpoint_for(cfg.model, data.titles, data.path))


if __name__ == "__main__":
    main()
