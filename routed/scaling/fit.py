"""Fitting the unified law and the dense law to (N, E, L) points.

The unified law has six parameters θ = (a, b, c, d, s, g) with s = log2 E_start and
g = log2(E_max / E_start): optimising in log2 space (as the paper's example notebook
does) keeps the expert counts positive, and g > 0 keeps E_max > E_start, so simple box
bounds describe the valid region. The objective is on residuals r = predicted log10 L -
observed log10 L (dimensionless, log10 of nats/token): least squares (`l2`, the paper's
and the default) or Huber with threshold δ (`huber`, Chinchilla's choice, robust to a
few diverged runs). scipy's bounded trust-region least_squares minimises it from a grid
of starts; a..d at each start are the exact linear least-squares solution for that
start's (E_start, E_max), since the law is linear in them. The best end point wins.
When the expert counts cannot pin down the saturation (a CPU sweep's E <= 8), hold
(E_start, E_max) fixed with `saturation=` and fit a..d alone.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize

from routed.scaling.curves import ScalingPoints
from routed.scaling.law import DenseLaw, UnifiedLaw

LN2, LN10 = math.log(2.0), math.log(10.0)
PARAMS = ('a', 'b', 'c', 'd', 'log2_e_start', 'log2_e_max_over_e_start')


@dataclasses.dataclass(frozen=True)
class Bounds:
  """Box bounds of the unified law's parameters (E in experts, the rest dimensionless).

  The defaults are loose: they only keep the optimiser in a region where the law is
  defined and well scaled (E_start in [1, 64], E_max at least 1.41 x E_start).
  """
  a: tuple[float, float] = (-2.0, 2.0)
  b: tuple[float, float] = (-2.0, 2.0)
  c: tuple[float, float] = (-1.0, 1.0)
  d: tuple[float, float] = (-20.0, 20.0)
  e_start: tuple[float, float] = (1.0, 64.0)
  e_max_over_e_start: tuple[float, float] = (2.0 ** 0.5, 2.0 ** 24)

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) in θ coordinates."""
    pairs = [self.a, self.b, self.c, self.d, np.log2(self.e_start),
             np.log2(self.e_max_over_e_start)]
    return np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)


# Starting (E_start, E_max) pairs: the range of the paper's fits and well beyond.
DEFAULT_STARTS = tuple((es, em) for es in (1.2, 2.0, 4.0, 10.0) for em in (64.0, 400.0, 4e3, 1e5))


@dataclasses.dataclass(frozen=True)
class UnifiedFit:
  """A fitted unified law and how well it fits.

  rmse: root mean squared residual in log10 L over the points; max_abs_residual the
  largest |residual|; at_bounds: fitted parameters (PARAMS names) that ended on a bound
  (the data do not pin them down within the bounds); residuals: predicted - observed
  log10 L.
  """
  law: UnifiedLaw
  rmse: float
  max_abs_residual: float
  n_points: int
  objective: str
  at_bounds: tuple[str, ...]
  residuals: np.ndarray
  saturation_fixed: bool = False  # E_start and E_max were given, not fitted

  def summary(self) -> dict:
    return {**self.law.as_dict(), 'rmse': self.rmse, 'n_cutoff': self.law.n_cutoff,
            'n_points': self.n_points, 'objective': self.objective,
            'saturation': 'fixed' if self.saturation_fixed else 'fitted',
            'at_bounds': list(self.at_bounds)}


def unpack(theta) -> UnifiedLaw:
  a, b, c, d, s, g = (float(t) for t in theta)
  return UnifiedLaw(a=a, b=b, c=c, d=d, e_start=2.0 ** s, e_max=2.0 ** (s + g))


def pack(law: UnifiedLaw) -> np.ndarray:
  return np.array([law.a, law.b, law.c, law.d, math.log2(law.e_start),
                   math.log2(law.e_max / law.e_start)])


def log10_e_hat_and_grad(e: np.ndarray, s: float, g: float):
  """u = log10 Ê(E) with E_start = 2^s, E_max = 2^(s+g), and ∂u/∂s, ∂u/∂g (each [P]).

  With K = (1/E_start - 1/E_max)^-1, t = E - 1 + K and q = 1/t + 1/E_max = 1/Ê:
  ∂q/∂s (E_max fixed) = -ln2 K^2 / (E_start t^2), ∂q/∂log2 E_max (E_start fixed) =
  ln2 / E_max (K^2/t^2 - 1); g moves E_max alone, s moves both.
  """
  e_start, e_max = 2.0 ** s, 2.0 ** (s + g)
  k = e_start / (1.0 - 2.0 ** (-g))
  t = e - 1.0 + k
  q = 1.0 / t + 1.0 / e_max
  dq_ds_fixed_max = -LN2 * k * k / (e_start * t * t)
  dq_dm = LN2 / e_max * (k * k / (t * t) - 1.0)
  scale = -1.0 / (q * LN10)
  return -np.log10(q), scale * (dq_ds_fixed_max + dq_dm), scale * dq_dm


def residuals_and_jacobian(theta, x: np.ndarray, e: np.ndarray, y: np.ndarray):
  """r = predicted - observed log10 L [P], and ∂r/∂θ [P, 6]; x = log10 N, y = log10 L."""
  a, b, c, d, s, g = theta
  u, du_ds, du_dg = log10_e_hat_and_grad(e, s, g)
  r = a * x + b * u + c * x * u + d - y
  slope_u = b + c * x
  jac = np.stack([x, u, x * u, np.ones_like(x), slope_u * du_ds, slope_u * du_dg], axis=1)
  return r, jac


def _linear_start(x, e, y, s, g, lower, upper) -> np.ndarray:
  """a..d by linear least squares at fixed (s, g), clipped into their bounds."""
  u, _, _ = log10_e_hat_and_grad(e, s, g)
  design = np.stack([x, u, x * u, np.ones_like(x)], axis=1)
  coef, *_ = np.linalg.lstsq(design, y, rcond=None)
  span = upper[:4] - lower[:4]
  return np.clip(coef, lower[:4] + 1e-9 * span, upper[:4] - 1e-9 * span)


def fit_unified(points: ScalingPoints, *, objective: str = 'l2', huber_delta: float = 1e-3,
                bounds: Bounds = Bounds(), starts=DEFAULT_STARTS,
                saturation: tuple[float, float] | None = None) -> UnifiedFit:
  """Fits the unified law to points (N dense params, E experts, L nats/token).

  objective: 'l2' (least squares on log10 L) or 'huber' (Huber loss on log10 L with
  threshold huber_delta, in log10 units). starts: (E_start, E_max) pairs to start
  from; each start's a..d is the linear least-squares solution there. saturation:
  (E_start, E_max) to hold fixed instead of fitting them (E_max may be math.inf;
  (1, inf) gives Ê = E): for data whose expert counts cannot pin down the saturation,
  e.g. E <= 8. Needs as many points as free parameters (6, or 4 with saturation);
  returns the best fit over the starts.
  """
  if objective not in ('l2', 'huber'):
    raise ValueError(f"objective must be 'l2' or 'huber', got {objective!r}")
  n, e, loss = (np.asarray(v, dtype=np.float64) for v in (points.n, points.e, points.loss))
  free = 6 if saturation is None else 4
  if len(n) < free:
    raise ValueError(f'the unified law has {free} free parameters; got {len(n)} points')
  if np.any(n <= 0) or np.any(e < 1) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
    raise ValueError('need N > 0, E >= 1 and finite L > 0 at every point')
  x, y = np.log10(n), np.log10(loss)
  lower, upper = bounds.arrays()
  if saturation is None:
    tails = [(float(np.clip(math.log2(es), lower[4], upper[4])),
              float(np.clip(math.log2(em / es), lower[5], upper[5]))) for es, em in starts]
  else:
    e_start, e_max = (float(v) for v in saturation)
    if not 1 <= e_start < e_max:
      raise ValueError(f'saturation needs 1 <= E_start < E_max, got {saturation}')
    tails = [(math.log2(e_start), math.log2(e_max / e_start))]  # inf when E_max is
  best = best_tail = None
  for s, g in tails:
    theta0 = _linear_start(x, e, y, s, g, lower, upper)
    if saturation is None:
      theta0 = np.concatenate([theta0, [s, g]])
    full = (lambda th: th) if saturation is None else (
        lambda th, s=s, g=g: np.concatenate([th, [s, g]]))
    result = optimize.least_squares(
        lambda th: residuals_and_jacobian(full(th), x, e, y)[0], theta0,
        jac=lambda th: residuals_and_jacobian(full(th), x, e, y)[1][:, :free],
        bounds=(lower[:free], upper[:free]), method='trf',
        loss='linear' if objective == 'l2' else 'huber',
        f_scale=1.0 if objective == 'l2' else huber_delta, x_scale='jac',
        xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
    if best is None or result.cost < best.cost:
      best, best_tail = result, full
  theta = best_tail(best.x)
  r = residuals_and_jacobian(theta, x, e, y)[0]
  tol = 1e-6 * (upper - lower)
  at_bounds = tuple(name for name, th, lo, hi, t in zip(PARAMS[:free], best.x, lower, upper, tol)
                    if th <= lo + t or th >= hi - t)
  return UnifiedFit(law=unpack(theta), rmse=float(np.sqrt(np.mean(r ** 2))),
                    max_abs_residual=float(np.max(np.abs(r))), n_points=len(n),
                    objective=objective, at_bounds=at_bounds, residuals=r,
                    saturation_fixed=saturation is not None)


def rmse_of(law: UnifiedLaw, points: ScalingPoints) -> float:
  """RMSE in log10 L of given coefficients (e.g. the published ones) on points."""
  r = law.log10_loss(points.n, points.e) - np.log10(points.loss)
  return float(np.sqrt(np.mean(r ** 2)))


@dataclasses.dataclass(frozen=True)
class DenseFit:
  """A fitted dense law; rmse in log10 L."""
  law: DenseLaw
  rmse: float
  n_points: int

  def summary(self) -> dict:
    return {**self.law.as_dict(), 'rmse': self.rmse, 'n_points': self.n_points}


def fit_dense(n, loss) -> DenseFit:
  """Fits L = (N_c/N)^α_N to dense runs: a straight line of log10 L against log10 N
  (slope -α_N, intercept α_N log10 N_c), by least squares. N in parameters, L in nats."""
  x = np.log10(np.asarray(n, dtype=np.float64))
  y = np.log10(np.asarray(loss, dtype=np.float64))
  if len(np.unique(x)) < 2:
    raise ValueError('the dense law needs runs of at least two sizes')
  slope, intercept = np.polyfit(x, y, 1)
  alpha = -float(slope)
  law = DenseLaw(alpha_n=alpha, n_c=float(10.0 ** (intercept / alpha)) if alpha else math.inf)
  r = slope * x + intercept - y
  return DenseFit(law=law, rmse=float(np.sqrt(np.mean(r ** 2))), n_points=len(x))
