"""``strategy='fellrec+'``: FELLRec with the settings that made its balance engage on the demo.

The paper's method (``strategy='fellrec'``, defaults of ``fellrec.*``) degenerates to a
near-uniform average here: every client's self-weight stays within a few thousandths of
1/N (issue 14, docs/results.md "Does the balance engage?"). This preset overrides only the
keys in :data:`PRESET`; every other ``fellrec.*`` key (alpha, beta, T, heating, exponent,
lr-scale) still applies. The values come from ``bench/balance_engage.py`` (see README).
"""

from __future__ import annotations

from dataclasses import replace

from fellrec_flwr.config import FellRecSettings

# fellrec.* field -> value the preset fixes (chosen from the measurements in docs/results.md)
PRESET: dict[str, object] = {
    "similarity_basis": "delta-w",
    "similarity_kernel": "softmax",
    "heating_loss": "normalised",
}


def preset_settings(settings: FellRecSettings) -> FellRecSettings:
    """``settings`` with the preset's keys replaced."""
    return replace(settings, **PRESET)  # type: ignore[arg-type]
