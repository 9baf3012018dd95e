"""NoPeek (`split.defence = nopeek`, fellrec_flwr/split/nopeek.py): distance correlation against a direct
computation, alpha = 0 is the training without a defence, and the term trains the client's front layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fellrec_flwr.config import ConfigError, LoraSettings, ModelConfig, TrainSettings, from_run_config
from fellrec_flwr.model.loading import add_lora, load_base_model
from fellrec_flwr.model.lora_state import get_lora_state
from fellrec_flwr.split.nopeek import NoPeek, NoPeekError, distance_correlation
from fellrec_flwr.train.trainer import train_local

TITLES = {i: f"Quest {chr(65 + i % 26)}{i} - Deluxe" for i in range(30)}


@dataclass(frozen=True)
class Ex:
    user_id: int
    history: tuple[int, ...]
    target: int


EXAMPLES = [Ex(u, tuple((u + k) % 30 for k in range(3)), (u + 3) % 30) for u in range(16)]
SETTINGS = TrainSettings(local_epochs=1, batch_size=4, max_length=96)


def dcor_numpy(x: np.ndarray, z: np.ndarray) -> float:
    """Textbook sample distance correlation (Szekely, Rizzo and Bakirov 2007), loops and all."""
    n = len(x)
    a = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    b = np.array([[np.linalg.norm(z[i] - z[j]) for j in range(n)] for i in range(n)])
    A = a - a.mean(axis=0)[None, :] - a.mean(axis=1)[:, None] + a.mean()
    B = b - b.mean(axis=0)[None, :] - b.mean(axis=1)[:, None] + b.mean()
    dcov2, dvx, dvz = (A * B).mean(), (A * A).mean(), (B * B).mean()
    return float(np.sqrt(dcov2 / np.sqrt(dvx * dvz)))


def test_distance_correlation_matches_a_direct_computation():
    x = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    z = np.array([[1.0], [0.0], [4.0], [9.0], [0.2]])  # a non-linear function of x, plus a bit
    got = float(distance_correlation(torch.tensor(x), torch.tensor(z)))
    assert got == pytest.approx(dcor_numpy(x, z), abs=1e-6)
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    z[:, 0] += x[:, 0] ** 2
    assert float(distance_correlation(torch.tensor(x), torch.tensor(z))) == pytest.approx(dcor_numpy(x, z), abs=1e-6)


def test_distance_correlation_is_one_for_a_similarity_map_and_near_zero_when_independent():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    assert float(distance_correlation(x, 3.0 * x @ q + 5.0)) == pytest.approx(1.0, abs=1e-5)
    # a general linear map (not distance-preserving) is still close to 1
    assert float(distance_correlation(x, x @ torch.randn(8, 4, generator=gen))) > 0.7
    # independent samples: the sample dCor (a V-statistic) is positive but shrinks towards 0 with n
    small = [float(distance_correlation(torch.randn(n, 2, generator=gen), torch.randn(n, 2, generator=gen)))
             for n in (50, 1500)]
    assert small[1] < 0.1 and small[1] < small[0]
    assert float(distance_correlation(x, torch.zeros(300, 3))) == pytest.approx(0.0, abs=1e-6)  # a constant carries nothing


def test_distance_correlation_rejects_unpaired_samples():
    with pytest.raises(NoPeekError, match="paired"):
        distance_correlation(torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(NoPeekError, match="nopeek-alpha"):
        NoPeek(-1.0)


def test_nopeek_settings_are_checked():
    with pytest.raises(ConfigError, match="set split.defence='nopeek'"):
        from_run_config({"split.nopeek-alpha": 0.5})
    with pytest.raises(ConfigError, match="nopeek-alpha"):
        from_run_config({"split.defence": "nopeek", "split.nopeek-alpha": -1.0})
    cfg = from_run_config({"split.defence": "nopeek", "split.nopeek-alpha": 0.5})
    assert cfg.split.nopeek_alpha == 0.5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, tmp_path_factory.mktemp("nopeek"))


def client_model(base):
    """A front_k = back_k = 1 split client's LoRA (layers 0 and 3 of the 4-layer tiny model)."""
    import copy

    model, _ = base
    return add_lora(copy.deepcopy(model), LoraSettings(r=4, alpha=8, dropout=0.0, layers="0,3"), seed=1)


def trained_state(base, alpha: float | None) -> dict[str, np.ndarray]:
    model = client_model(base)
    penalty = None
    if alpha is not None:
        nopeek = NoPeek(alpha, seed=0).attach(model, front_k=1)
        penalty = nopeek.take
    train_local(model, base[1], EXAMPLES, TITLES, SETTINGS, seed=3, progress=False, penalty=penalty)
    return dict(get_lora_state(model))


def test_alpha_zero_is_the_training_without_a_defence(base):
    plain, zero, some = trained_state(base, None), trained_state(base, 0.0), trained_state(base, 5.0)
    assert plain.keys() == zero.keys()
    assert all(np.array_equal(plain[k], zero[k]) for k in plain)  # bit for bit
    assert any(not np.array_equal(plain[k], some[k]) for k in plain)  # while alpha > 0 changes the training


def test_the_term_trains_the_front_layers_only(base):
    model, tok = client_model(base), base[1]
    nopeek = NoPeek(1.0, seed=0).attach(model, front_k=1)
    model.train()
    batch = tok(["Quest A0 - Deluxe, Quest B1 - Deluxe", "Quest C2 - Deluxe"], return_tensors="pt", padding=True)
    model(**batch, use_cache=False)
    term = nopeek.take()
    assert term is not None and 0 < float(term) <= 1.0 + 1e-6
    assert nopeek.take() is None  # taken once
    term.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    front = [g for n, g in grads.items() if ".layers.0." in n]
    back = [g for n, g in grads.items() if ".layers.3." in n]
    assert front and back
    assert sum(float(g.abs().sum()) for g in front if g is not None) > 0  # into the client's front LoRA
    assert all(g is None or float(g.abs().sum()) == 0 for g in back)  # the term does not reach past the cut
    # no term in evaluation (model.eval / no grad)
    model.eval()
    with torch.no_grad():
        model(**batch, use_cache=False)
    assert nopeek.take() is None
    nopeek.detach()
    model.train()
    model(**batch, use_cache=False)
    assert nopeek.take() is None  # detached: no hook left
