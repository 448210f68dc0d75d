"""The scaling laws of Clark et al. 2022, "Unified Scaling Laws for Routed Language
Models" (ICML 2022): the unified law of a router, the dense law, the effective parameter
count and N_cutoff, with the paper's published coefficients.

Units: N is the dense parameter count (parameters one token sees; a plain count, not
millions), E the number of experts per routed layer, L the validation loss in nats per
token. Logarithms are base 10 except where a name says log2.

Unified law (eq. 1 of the paper):
  log10 L(N, E) = a log10 N + b log10 Ê + c log10 N log10 Ê + d,
  Ê = 1 / (1 / (E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max),
so Ê(1) = E_start, Ê ≈ E - 1 + E_start for E_start << E << E_max, and Ê -> E_max as
E -> infinity (routing saturates).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def e_hat(e, e_start: float, e_max: float):
  """The saturating transform Ê(E) of the expert count (same shape as e)."""
  if not 0 < e_start < e_max:
    raise ValueError(f'need 0 < e_start < e_max, got e_start={e_start}, e_max={e_max}')
  offset = 1.0 / (1.0 / e_start - 1.0 / e_max)
  return 1.0 / (1.0 / (np.asarray(e, dtype=np.float64) - 1.0 + offset) + 1.0 / e_max)


@dataclasses.dataclass(frozen=True)
class UnifiedLaw:
  """log10 L = a log10 N + b log10 Ê + c log10 N log10 Ê + d (see the module docstring)."""
  a: float
  b: float
  c: float
  d: float
  e_start: float
  e_max: float

  def log10_loss(self, n, e):
    """log10 of the predicted loss (nats/token) at dense size N and E experts."""
    x = np.log10(np.asarray(n, dtype=np.float64))
    u = np.log10(e_hat(e, self.e_start, self.e_max))
    return self.a * x + self.b * u + self.c * x * u + self.d

  def loss(self, n, e):
    """The predicted loss in nats/token."""
    return 10.0 ** self.log10_loss(n, e)

  def exponent_n(self, e):
    """α_N(Ê) = a + c log10 Ê: the slope of log10 L in log10 N at E experts."""
    return self.a + self.c * np.log10(e_hat(e, self.e_start, self.e_max))

  def effective_params(self, n, e):
    """The dense size N̄ with L(N̄, 1) = L(N, E): what E experts are worth in parameters.

    At E = 1 the law reads log10 L = α_N(1) log10 N + b log10 E_start + d (Ê(1) = E_start),
    so log10 N̄ = (α_N(E) log10 N + b (log10 Ê - log10 E_start)) / α_N(1).
    """
    x = np.log10(np.asarray(n, dtype=np.float64))
    u = np.log10(e_hat(e, self.e_start, self.e_max))
    u1 = math.log10(self.e_start)
    return 10.0 ** (((self.a + self.c * u) * x + self.b * (u - u1)) / (self.a + self.c * u1))

  @property
  def n_cutoff(self) -> float:
    """The N where b + c log10 N = 0, i.e. 10^(-b/c) (inf when c = 0).

    ∂ log10 L / ∂ log10 Ê = b + c log10 N, so with b < 0 < c (the paper's fits) more
    experts lower the loss below N_cutoff and stop helping above it; `routing_helps`
    says which side a given N is on for any signs. Compute it from unrounded
    coefficients: at the paper's values 10^(-b/c) moves by about a factor of 10 when c
    moves by 0.001.
    """
    if self.c == 0:
      return math.inf
    exponent = -self.b / self.c
    return 10.0 ** exponent if exponent < 308 else math.inf

  def routing_helps(self, n):
    """Whether more experts lower the predicted loss at dense size N: b + c log10 N < 0."""
    return self.b + self.c * np.log10(np.asarray(n, dtype=np.float64)) < 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DenseLaw:
  """L(N) = (N_c / N)^α_N (Kaplan et al. 2020), i.e. log10 L = α_N (log10 N_c - log10 N)."""
  alpha_n: float
  n_c: float

  def log10_loss(self, n):
    return self.alpha_n * (math.log10(self.n_c) - np.log10(np.asarray(n, dtype=np.float64)))

  def loss(self, n):
    """The predicted loss in nats/token of a dense model with N parameters."""
    return 10.0 ** self.log10_loss(n)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# Table of the paper (and ../shared/reference/routing-facts.md); c is printed with three
# decimals, so N_cutoff recomputed from these is only approximate (the paper quotes
# S-BASE 937B, RL-R 85B, Hash 83B at 130B training tokens).
PUBLISHED = {
    'S-Base': UnifiedLaw(a=-0.082, b=-0.108, c=0.009, d=1.104, e_start=1.847, e_max=314.478),
    'RL-R': UnifiedLaw(a=-0.083, b=-0.126, c=0.012, d=1.111, e_start=1.880, e_max=469.982),
    'Hash': UnifiedLaw(a=-0.087, b=-0.136, c=0.012, d=1.157, e_start=4.175, e_max=477.741),
}
PUBLISHED_DENSE = DenseLaw(alpha_n=0.078, n_c=3.568e13)
PUBLISHED_N_CUTOFF = {'S-Base': 937e9, 'RL-R': 85e9, 'Hash': 83e9}
