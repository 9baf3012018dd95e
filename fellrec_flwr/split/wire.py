"""The wire between split clients and the split service: gRPC method names and the tensor format.

The service is `fellrec.split.v2.SplitService` over gRPC with raw-bytes messages (no protobuf
schema: each request and reply is the bytes below, or JSON where `fellrec_flwr.split.engine`
says so). A tensor message is a safetensors buffer: an 8-byte little-endian header length, a
JSON header naming each tensor's dtype, shape and byte offsets (plus a string->string
``__metadata__`` map for small parameters such as a session id), then the raw little-endian
bytes. No pickle, no code: decoding can only ever produce tensors and strings.

Hidden states and gradients may travel in float16/bfloat16 (`SplitSettings.wire_dtype`)
to halve the bytes; the receiver computes in its own dtype.
"""

from __future__ import annotations

import json
import struct
from typing import Mapping

import torch

SERVICE = "fellrec.split.v2.SplitService"
METHODS = ("Forward", "Backward", "InferCreate", "InferStep", "InferClose", "Info", "Health")


# A refusal's trailing metadata: the engine's machine-readable code and its HTTP-style status class
# (the gRPC status carries the message). Absent when the gRPC library itself refused a call.
ERROR_CODE_KEY = "fellrec-error-code"
ERROR_STATUS_KEY = "fellrec-error-status"


def method_path(name: str) -> str:
    """The gRPC path of a method: /fellrec.split.v2.SplitService/Forward."""
    return f"/{SERVICE}/{name}"


WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                       "bfloat16": torch.bfloat16}
FLOAT_DTYPES = frozenset(WIRE_DTYPES.values())
MAX_HEADER_BYTES = 1 << 20  # a request names a handful of tensors; a bigger header is an attack


class WireError(ValueError):
    """A body that is not a well-formed tensor message."""


def wire_dtype(name: str) -> torch.dtype:
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise WireError(f"wire dtype {name!r} is not one of {', '.join(WIRE_DTYPES)}.") from None


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize CPU copies of `tensors` (+ string metadata) to safetensors bytes."""
    from safetensors.torch import save

    plain = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return save(plain, metadata=meta or None)


def read_header(data: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries {name: {dtype, shape, data_offsets}}, metadata) from a body, validated.

    Cheap: only the header is parsed, so shapes and dtypes can be checked before any
    tensor is materialised.
    """
    if len(data) < 8:
        raise WireError(f"body of {len(data)} bytes is too short for a safetensors header.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise WireError(f"safetensors header length {n} does not fit the {len(data)}-byte body (truncated?).")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"safetensors header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise WireError("safetensors header must be a JSON object.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WireError("safetensors __metadata__ must map strings to strings.")
    payload = len(data) - 8 - n
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2):
            raise WireError(f"tensor {name!r} has a malformed header entry.")
        if not all(isinstance(d, int) and d >= 0 for d in entry["shape"]):
            raise WireError(f"tensor {name!r} has a malformed shape {entry['shape']}.")
        if entry["data_offsets"][1] > payload:
            raise WireError(f"tensor {name!r} ends past the end of the body (truncated?).")
    return header, meta


def decode(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) from safetensors bytes; any malformation raises WireError."""
    from safetensors.torch import load

    _, meta = read_header(data)
    try:
        tensors = load(data)
    except Exception as err:  # the Rust parser raises SafetensorError and friends
        raise WireError(f"not a valid safetensors body: {err}") from None
    return tensors, meta
