"""Shared test fixtures.

Tests use the built-in tiny model and small fixtures; tests that need `../shared`
(real data, the SmolLM2 GGUF) skip with a message when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FELLREC_SHARED", ROOT.parent / "shared"))
GAMES_DIR = SHARED / "data" / "amazon-games"
SMOLLM_DIR = SHARED / "models" / "smollm2-135m-instruct"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def need_games() -> Path:
    if not (GAMES_DIR / "Games-6k.item").exists():
        pytest.skip(f"needs the Amazon Games data at {GAMES_DIR} (../shared is absent in a user's clone)")
    return GAMES_DIR


def need_smollm() -> Path:
    if not any(SMOLLM_DIR.glob("*.gguf")):
        pytest.skip(f"needs the SmolLM2 GGUF under {SMOLLM_DIR} (../shared is absent in a user's clone)")
    return SMOLLM_DIR


@pytest.fixture(autouse=True, scope="session")
def flower_task_identity():
    """Flower >= 1.3x refuses to build a Message outside a Flower process unless a task
    identity is set (private API; see ../shared/notes/flower-1.42.md section 8)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older flwr: nothing to set
        yield
        return
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tiny model is faster on one thread, and CI shares 2 cores with Ray actors."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """A folder shared by one test module (tiny tokenizer, converted models)."""
    return tmp_path_factory.mktemp("work")
