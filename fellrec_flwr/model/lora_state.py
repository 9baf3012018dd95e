"""A client's LoRA as plain numpy arrays, and its Flower `ArrayRecord` form.

A LoRA state is an ordered ``dict[str, np.ndarray]`` (float32) keyed like peft's
adapter state dict (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``,
adapter name removed). The order is the model's module order, the same in every
process that builds the same model with the same LoRA settings; :func:`flatten_state`
concatenates in that order. Always float32 on the wire: Flower's `Array` has no bfloat16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

LoraState = dict[str, np.ndarray]


class LoraStateError(ValueError):
    """A LoRA state does not fit the model (different keys or shapes)."""


def _peft_state(model: PeftModel) -> dict[str, torch.Tensor]:
    # save_embedding_layers=False: with "auto" peft may probe the hub for the base config.
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def get_lora_state(model: PeftModel) -> LoraState:
    """The adapter weights as float32 numpy arrays (copies, on the CPU)."""
    return {key: value.detach().to("cpu", torch.float32).numpy().copy()
            for key, value in _peft_state(model).items()}


def check_state_matches(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, np.ndarray]) -> None:
    """Raise LoraStateError naming the differing keys/shapes; `expected` maps key -> shape."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise LoraStateError(
            f"LoRA state does not match the model: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}. Both sides must use the same "
            "model and lora.target-modules / lora.layers."
        )
    wrong = [(k, tuple(np.shape(state[k])), tuple(shape)) for k, shape in expected.items()
             if tuple(np.shape(state[k])) != tuple(shape)]
    if wrong:
        key, got, want = wrong[0]
        raise LoraStateError(f"LoRA state shape mismatch for {len(wrong)} tensor(s), e.g. {key}: got {got}, "
                             f"model has {want}. Both sides must use the same model and lora.r.")


def set_lora_state(model: PeftModel, state: Mapping[str, np.ndarray]) -> None:
    """Load adapter weights into `model` (in place), after checking keys and shapes."""
    current = _peft_state(model)
    check_state_matches({k: tuple(v.shape) for k, v in current.items()}, state)
    tensors = {k: torch.as_tensor(np.asarray(state[k]), dtype=v.dtype, device=v.device)
               for k, v in current.items()}
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise LoraStateError(f"peft did not load {len(unexpected)} LoRA tensor(s), e.g. {unexpected[:3]}.")


def flatten_state(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """All tensors as one float32 vector, in the state's key order."""
    if not state:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in state.values()])


def num_parameters(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).size for v in state.values()))


def state_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Flower needs `Array`-wrapped values (a dict of raw ndarrays is rejected)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> LoraState:
    """Back to float32 numpy arrays, keeping the record's key order."""
    return {k: np.asarray(arr.numpy(), dtype=np.float32) for k, arr in record.items()}


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the file names peft's save_pretrained writes


def save_adapter_folder(state: Mapping[str, np.ndarray], config: Any, out_dir: str | Path) -> Path:
    """A peft adapter folder (`PeftModel.from_pretrained(base, out_dir)` loads it) from a LoRA state
    and its peft `LoraConfig`, without the base model: what `PeftModel.save_pretrained` writes."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir
