"""Load the base LLM and its tokenizer, and wrap it with LoRA.

``model.name`` selects the source:

- ``"tiny"``: a random LLaMA (fellrec_flwr.model.tiny) with a BPE tokenizer trained on the
  catalogue titles and the prompt template. The tokenizer is saved under ``work_dir`` in a
  folder named by a fingerprint of its training texts; base weights come from a fixed seed,
  so every process of a run gets the same model.
- a ``.gguf`` file, or a folder holding exactly one: de-quantised by transformers (about
  20 s for SmolLM2-135M). The first load writes a plain safetensors copy (and the tokenizer)
  under ``work_dir/base-models/``; later loads read that copy in about a second.
- anything else: a Hugging Face id or a local folder, loaded with ``local_files_only`` when
  ``HF_HUB_OFFLINE`` is set (this project runs without network).

``model.quantization`` 8bit/4bit uses bitsandbytes and needs CUDA.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fellrec_flwr.model import tiny
from fellrec_flwr.model.precision import cast_model
from fellrec_flwr.config import LoraSettings, ModelConfig
from fellrec_flwr.data.prompts import template_texts
from fellrec_flwr.seeding import seeded_torch

TINY_BASE_SEED = 0  # the tiny model's weights; fixed so that all processes agree
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """The base model or tokenizer cannot be loaded as configured."""


class LoraTargetError(ValueError):
    """The LoRA settings name modules or layers that the model does not have."""


# --------------------------------------------------------------------------- settings


def resolve_device(name: str, key: str = "model.device") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` require CUDA (and GPU N visible)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        warn_if_gpus_hidden(key)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"{key}={name!r} but CUDA is not available; use 'auto' or 'cpu'.")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ModelLoadError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        # a Flower simulation's client actor sees only the GPU Ray gave it, always as cuda:0
        raise ModelLoadError(f"{key}={name!r} but this process sees {torch.cuda.device_count()} GPU(s) "
                             "(CUDA_VISIBLE_DEVICES; a simulation's client sees only its own GPU, as cuda:0); "
                             "use 'cuda' or 'auto'.")
    return device


NVIDIA_GPU_DIR = Path("/proc/driver/nvidia/gpus")  # one folder per GPU, whatever CUDA_VISIBLE_DEVICES says
_WARNED_HIDDEN = False


def machine_gpus() -> int:
    """NVIDIA GPUs the driver knows on this machine, also those hidden from this process."""
    try:
        return sum(1 for _ in NVIDIA_GPU_DIR.iterdir())
    except OSError:
        return 0


def warn_if_gpus_hidden(key: str = "model.device") -> None:
    """Say so (once per process) when `auto` falls back to the CPU on a machine that has GPUs: in a
    Flower simulation Ray hides them from every client without client-resources num-gpus."""
    global _WARNED_HIDDEN
    gpus = machine_gpus()
    if gpus and not _WARNED_HIDDEN:
        _WARNED_HIDDEN = True
        import logging

        logging.getLogger(__name__).warning(
            "%s=auto runs on the CPU although this machine has %d NVIDIA GPU(s): CUDA_VISIBLE_DEVICES=%r hides "
            "them from this process. In a simulation give each client a share of a GPU: python -m fellrec_flwr.run "
            "--federation-config \"... client-resources-num-gpus=0.25\" (docs/gpu.md).",
            key, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"model.dtype={name!r} is not one of float32, bfloat16, float16.") from None


def quantization_config(model_cfg: ModelConfig, device: torch.device):
    """A BitsAndBytesConfig for 8bit/4bit, or None; a clear error where it cannot work."""
    if model_cfg.quantization == "none":
        return None
    if model_cfg.quantization not in ("8bit", "4bit"):
        raise ModelLoadError(f"model.quantization={model_cfg.quantization!r} is not one of none, 8bit, 4bit.")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.quantization={model_cfg.quantization!r} needs a CUDA GPU (bitsandbytes); this process "
            f"runs on {device}. Set model.quantization='none' (and model.dtype='float32') on CPU."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"model.quantization={model_cfg.quantization!r} needs the bitsandbytes package: "
            "install the project with the 'gpu' extra (pip install 'fellrec-flwr[gpu]')."
        )
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype_for(model_cfg))


def compute_dtype_for(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype activations run in: model.dtype, also under 8/4-bit (whose weights are int8/uint8).
    float32 weights quantised to 8/4 bit compute in float16 (bitsandbytes' own default), in the whole
    model and in the split parts alike."""
    dtype = resolve_dtype(model_cfg.dtype)
    if model_cfg.quantization in ("8bit", "4bit") and dtype == torch.float32:
        return torch.float16
    return dtype


# --------------------------------------------------------------------------- loading


def load_base_model(
    model_cfg: ModelConfig,
    titles: Mapping[int, str] | Sequence[str],
    work_dir: str | Path,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model (eval mode, on its device) and its tokenizer (left padding, pad token set)."""
    device = resolve_device(model_cfg.device)
    dtype = compute_dtype_for(model_cfg)  # model.dtype; float16 for float32 weights under 8/4-bit
    quant = quantization_config(model_cfg, device)
    name = model_cfg.name.strip()
    if not name:
        raise ModelLoadError("model.name is empty; use 'tiny', a .gguf file, a local folder or a Hugging Face id.")
    if name == "tiny":
        if quant is not None:
            raise ModelLoadError("model.name='tiny' cannot be quantized; set model.quantization='none'.")
        model, tokenizer = _load_tiny(model_cfg, titles, Path(work_dir))
    elif (gguf := find_gguf(name)) is not None:
        model, tokenizer = _load_gguf(gguf, dtype, quant, Path(work_dir), device)
    elif name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise ModelLoadError(f"model.name={name!r}: no such file or folder.")
    else:
        model, tokenizer = _load_pretrained(name, dtype, quant, device)
    _ensure_pad_token(tokenizer, model)
    tokenizer.padding_side = "left"  # generation pads on the left; training pads itself
    if quant is None:
        model = cast_model(model, device, dtype)  # rotary frequencies stay float32
    model.eval()
    return model, tokenizer


def find_gguf(name: str) -> Path | None:
    """The GGUF file meant by `name` (a .gguf path, or a folder with exactly one), else None."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.name={name!r}: no such GGUF file.")
        return path
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise ModelLoadError(f"model.name={name!r} holds {len(files)} .gguf files "
                                 f"({', '.join(f.name for f in files)}); name one of them.")
        if files and not (path / "config.json").exists():
            return files[0]
    return None


def _load_tiny(model_cfg: ModelConfig, titles: Mapping[int, str] | Sequence[str],
               work_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    texts = _tokenizer_texts(titles)
    fingerprint = hashlib.sha256("\n".join([str(model_cfg.tiny_vocab), *texts]).encode()).hexdigest()[:12]
    tokenizer = tiny.train_tokenizer(texts, model_cfg.tiny_vocab, work_dir / f"tokenizer-{fingerprint}")
    model = tiny.build_tiny_model(tokenizer, hidden=model_cfg.tiny_hidden, layers=model_cfg.tiny_layers,
                                  heads=model_cfg.tiny_heads, seed=TINY_BASE_SEED)
    if isinstance(titles, Mapping):  # public warm-up, as a real pretrained LLM would have had
        shape = f"{model_cfg.tiny_hidden}x{model_cfg.tiny_layers}x{model_cfg.tiny_heads}"
        cache = work_dir / f"tiny-base-{fingerprint}-{shape}-p{model_cfg.tiny_pretrain_prompts}-{tiny.PRETRAIN_RECIPE}.safetensors"
        tiny.load_or_pretrain(model, tokenizer, dict(titles), model_cfg.tiny_pretrain_prompts, cache)
    return model, tokenizer


def _tokenizer_texts(titles: Mapping[int, str] | Sequence[str]) -> list[str]:
    """Template words + titles in item-id order (a fixed order keeps BPE training identical)."""
    values = [titles[k] for k in sorted(titles)] if isinstance(titles, Mapping) else list(titles)
    if not values:
        raise ModelLoadError("the tiny model needs the catalogue titles to train its tokenizer; got none.")
    return template_texts() + [str(v) for v in values]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def quantized_device_map(device: torch.device) -> dict[str, int]:
    """Where bitsandbytes puts the whole model: the configured ``cuda:N``; for a bare ``cuda``
    the current device (a Flower simulation sets CUDA_VISIBLE_DEVICES per client actor, so
    that is the GPU the simulation assigned to this client)."""
    if device.type != "cuda":
        raise ModelLoadError(f"8bit/4bit weights live on a CUDA GPU; the configured device is {device}.")
    return {"": device.index if device.index is not None else torch.cuda.current_device()}


def _load_pretrained(name: str, dtype: torch.dtype, quant,
                     device: torch.device | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    local_only = _offline() or Path(name).expanduser().is_dir()
    kwargs: dict = {"dtype": dtype, "local_files_only": local_only}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map=quantized_device_map(device or torch.device("cuda")))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load model.name={name!r}{' offline' if local_only else ''} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Use a local folder with config.json and "
            "weights, a .gguf file (e.g. ../shared/models/smollm2-135m-instruct), or 'tiny'."
        ) from err
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, quant,
               work_dir: Path, device: torch.device | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF through a safetensors copy under work_dir (written on first use)."""
    return _load_pretrained(str(resolve_checkpoint(path, work_dir)), dtype, quant, device)


def converted_gguf_dir(gguf: Path, work_dir: str | Path) -> Path:
    """Where the safetensors copy of `gguf` lives: named by its path, size and mtime, so an
    edited file gets a new copy and every process (clients, service, trainer) finds the same one."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(work_dir).expanduser() / "base-models" / f"{gguf.stem}-{key}"


def resolve_checkpoint(name: str | Path, work_dir: str | Path) -> Path:
    """A folder of safetensors for `name`: a safetensors folder as is, or a GGUF file converted once.

    The conversion de-quantises the whole model once (a preparation step); later partial
    loads (`fellrec_flwr.model.parts`) read only the tensors they need from the copy.
    """
    gguf = find_gguf(str(name))
    if gguf is None:
        path = Path(name).expanduser()
        if not (path.is_file() and path.suffix == ".safetensors") and not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"no .safetensors file in {path}; give a GGUF file, a folder with safetensors "
                                 "weights, or save the model with split.save_full_model().")
        return path
    out = converted_gguf_dir(gguf, work_dir)
    if not (out / "config.json").exists():
        from filelock import FileLock

        # one conversion per machine: client actors that start together would each de-quantise the whole
        # model at once (float32: ~27 GB for a 7B model); the others wait, then read the copy
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out.parent / f".{out.name}.lock")):
            if not (out / "config.json").exists():
                _convert_gguf(gguf, out)
    return out


def _convert_gguf(path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF once and save it as a plain transformers folder (atomically).

    transformers refuses to save a GGUF-loaded model, so its weights are moved into a
    fresh model of the same architecture built from the config without the GGUF marker.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # gguf missing, unsupported architecture, corrupt file ...
        raise ModelLoadError(f"cannot load the GGUF file {path} ({type(err).__name__}: {err}). "
                             "It needs the 'gguf' package and an architecture transformers supports.") from err
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").exists():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token (unk, else eos); labels never rely on it (see collate)."""
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ModelLoadError("the tokenizer has neither a pad, unk nor eos token; cannot pad batches.")
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------- LoRA


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names (e.g. ``q_proj``) of the linear layers LoRA can target."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def num_layers(model: PreTrainedModel) -> int:
    return int(model.config.num_hidden_layers)


def is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def add_lora(model: PreTrainedModel, lora_cfg: LoraSettings, seed: int) -> PeftModel:
    """Wrap `model` with LoRA adapters; only the adapters are trainable.

    The adapters' random initialisation is drawn under `seed`, so every process that
    calls this with the same seed (and base model) starts from identical LoRA weights.
    """
    targets = lora_cfg.target_list()
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if not targets or missing:
        raise LoraTargetError(
            f"lora.target-modules={lora_cfg.target_modules!r}: {', '.join(missing) or 'empty'} not in the "
            f"model. Linear modules available: {', '.join(available)}."
        )
    layers = lora_cfg.layer_list()
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers(model)]
        if bad or not layers:
            raise LoraTargetError(f"lora.layers={lora_cfg.layers!r}: the model has layers "
                                  f"0..{num_layers(model) - 1}; {bad} are out of range.")
    config = peft_lora_config(lora_cfg)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(model)
    with seeded_torch(seed):
        return get_peft_model(model, config)


def peft_lora_config(lora_cfg: LoraSettings) -> LoraConfig:
    """The peft LoraConfig for these settings (also written next to saved adapters)."""
    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_list(),
        layers_to_transform=lora_cfg.layer_list(),
        bias="none",
        task_type="CAUSAL_LM",
    )
