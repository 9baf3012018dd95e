"""``strategy='fellrec+'``: FELLRec with the similarity settings under which its balance engages.

The paper's method (``strategy='fellrec'``, the ``fellrec.*`` defaults) degenerates to a
near-uniform average: on the demo every client's self-weight W_ii stays at 0.206-0.215
for 5 clients (1/N = 0.2), because all clients share the LoRA initialisation and the cosine
of the raw (A, B) parameters is close to 1 for everyone. Measured with
``bench/balance_engage.py`` (docs/results.md, "Does the balance engage?"):

- ``delta-w`` similarity (cosine of the LoRA products B A, which only sees what clients
  learned, since B starts at 0, and does not depend on how LoRA factorises the update)
  with the paper's linear kernel: self-weight 0.31 in round 1, fading to 0.24 by round 3;
- with the softmax kernel at tau 0.5: self-weight 0.58-0.60 in round 1 and 0.46-0.48 in
  round 3, i.e. each client keeps about half of its own adapter and takes the rest from the
  others by similarity (tau 0.3: ~0.8; tau 0.1: ~1.0, which is local training).

So the preset fixes basis, kernel and tau; every other ``fellrec.*`` key (alpha, beta, T,
heating, exponent, lr-scale, heating-loss) still applies. Curriculum heating did not
engage in any setting measured (smallest warm weight 0.975 in round 1, 1.000 after), so
the preset leaves it as the paper has it. Whether it recommends better than FedAvg is the
quality benchmark's question, not this preset's evidence.
"""

from __future__ import annotations

from dataclasses import replace

from fellrec_flwr.config import FellRecSettings

# fellrec.* field -> value the preset fixes (measured: docs/results.md, bench/results/balance_engage.csv)
PRESET: dict[str, object] = {
    "similarity_basis": "delta-w",
    "similarity_kernel": "softmax",
    "similarity_temperature": 0.5,
}


def preset_settings(settings: FellRecSettings) -> FellRecSettings:
    """``settings`` with the preset's keys replaced."""
    return replace(settings, **PRESET)  # type: ignore[arg-type]
