"""The negative-sampling proposal q(v) ~ count(v)^power, drawn with O(1) expected work per draw.

torch.multinomial over all V items rebuilds a V-sized cumulative table on every call, so a
step's negatives cost O(V) (`dr bench negatives`: it outgrows the training step itself at
catalog scale). Here items are grouped once into weight classes that each span a factor of two
(class c holds the items with w in [w_min 2^c, w_min 2^(c+1)), bound b_c = w_min 2^(c+1)). A
candidate is a class drawn in proportion to size_c x b_c (a search over a few dozen classes) and
an item uniform inside it, accepted with probability w / b_c >= 1/2: the accepted candidates are
independent exact draws, a batch of 2.5 n candidates almost always yields n, and the build is
one sort (a vectorized alias-table build needs one pass per pairing round, which a
steep catalog turns into hundreds of thousands of passes).

Memory per worker: 12 bytes per item (members int64, log-weights float32) plus the float32
log-Q table the sampled softmax reads (the per-item state ray_trainers.estep lists).
"""
from __future__ import annotations

import math

import torch

OVERSAMPLE = 2.5          # candidates per draw needed (acceptance >= 1/2 overall)


class Proposal:
    """q(v) = w_v / sum w, w = max(count, 1)^power: draws [n] and log of expected draw counts."""

    def __init__(self, counts: torch.Tensor, power: float = 0.75) -> None:
        w = counts.double().clamp_min(1.0) ** power
        self.num_items = int(w.numel())
        self.log_w = w.log().float()                                   # [V] by item
        self.log_total = float(torch.logsumexp(w.log(), 0))
        cls = torch.floor(torch.log2(w / w.min())).long().clamp_min(0)  # [V] class of each item
        self.members = torch.argsort(cls, stable=True)                  # [V] items grouped by class
        sizes = torch.bincount(cls)                                     # [C]
        self.start = torch.cumsum(sizes, 0) - sizes                     # [C] first member of each class
        self.sizes = sizes
        # log of each class's upper weight bound; acceptance = w / bound
        self.log_cap = (math.log(float(w.min())) + (torch.arange(len(sizes)) + 1) * math.log(2.0)).float()
        # A class is proposed in proportion to size x bound, so every candidate item has weight
        # `bound` before acceptance: accepted draws are exactly q, and independent.
        env = sizes.double() * self.log_cap.double().exp()
        self.cdf = torch.cumsum(env / env.sum(), 0)                     # [C]
        self.cdf[-1] = 1.0

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n draws from q -> item indices [n] int64."""
        got: list[torch.Tensor] = []
        need = n
        while need > 0:
            m = int(need * OVERSAMPLE) + 8         # acceptance >= 1/2: one pass almost always does
            c = torch.searchsorted(self.cdf, torch.rand(m, generator=gen, dtype=torch.float64)).clamp_max(len(self.cdf) - 1)
            pick = self.start[c] + (torch.rand(m, generator=gen, dtype=torch.float64) * self.sizes[c]).long()
            v = self.members[pick.clamp_max(self.num_items - 1)]
            v = v[torch.rand(m, generator=gen).log() < self.log_w[v] - self.log_cap[c]][:need]
            got.append(v)
            need -= len(v)
        return got[0] if len(got) == 1 else torch.cat(got)

    def log_q(self, num_samples: int) -> torch.Tensor:
        """log of each item's expected count among num_samples draws, [V] float32 (the log-Q correction)."""
        return self.log_w + (math.log(num_samples) - self.log_total)


__all__ = ["Proposal"]
