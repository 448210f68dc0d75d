"""The maximal-update parametrization (μP) for MoE: initialisation, per-parameter
learning rates and output multipliers that make the best learning rate the same at
every width (model.parametrization = mup, model.mup_base_width).

Sources: Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via
Zero-Shot Hyperparameter Transfer", Table 3 (the rules for Adam); Małaśnicki et al.
2025, "μ-Parameterization for Mixture of Experts" (arXiv:2508.09752), which extends
them to MoE layers: an expert is a hidden (width-to-width) MLP like the dense one,
and the router, which maps the width to a fixed number of expert logits, scales as an
output layer.

With width multiplier w = model.d_model / model.mup_base_width, the base width (w = 1)
is exactly the standard parametrization, so a learning rate tuned there carries over.
sigma is each parameter's standard init std and eta the learning rate (train.
learning_rate and its schedule; Adam):

  parameter                                 role     init std     Adam LR   multiplier
  embed (token embedding)                   input    sigma        eta       -
    ... tied, as the output projection      output   sigma        eta       logits / w
  unembed (untied output projection)        output   sigma / w    eta / w   -
  attention qkv | q, kv | out               hidden   sigma / √w   eta / w   -
  attention scores q . k                    -        -            -         1/Dh, not
                                                                            1/√Dh (*)
  dense MLP and shared experts wi, wo       hidden   sigma / √w   eta / w   -
  experts wi, wo [E, ...] (per expert)      hidden   sigma / √w   eta / w   -
  MoE router kernel [D, E] (Soft MoE phi)   output   sigma / w    eta / w   -
  MoD router [D], its predictor             output   sigma / w    eta / w   -
  norm scales [D]                           vector   1            eta       -

(*) scores are q . k * √(Dh_base) / Dh, which is the standard 1/√Dh at the base width
(queries are multiplied by √(Dh_base / Dh) before the attention kernel). Hidden
weights' fan-in grows with w when model.d_ff grows with model.d_model (as in the
transfer sweeps); the rules assume that. Weight decay is decoupled (AdamW) and so
scales with each parameter's learning rate. Depth, expert count and granularity are
held fixed: μP here transfers across width only.
"""

from __future__ import annotations

import math
import re

import jax
import optax

from routed import sharding

# Parameter path pattern -> role (rules above); the first match wins.
ROLES = (
    (r'embed', 'input'),
    (r'unembed', 'output'),
    (r'.*(norm/scale|scale)', 'vector'),
    (r'.*router(/.*)?', 'output'),               # MoE (kernel), Soft MoE (phi), MoD routers
    (r'.*predictor/.*', 'output'),
    (r'.*(attn|ffn|shared|experts)/(qkv|q|kv|out|wi|wo)', 'hidden'),
)


def role(path: str) -> str:
  for pattern, name in ROLES:
    if re.fullmatch(pattern, path):
      return name
  raise KeyError(f'parameter {path} has no role in routed.model.mup.ROLES')


def width_multiplier(model_cfg) -> float:
  """w = d_model / mup_base_width under μP; 1 for the standard parametrization."""
  if model_cfg.parametrization != 'mup':
    return 1.0
  return model_cfg.d_model / model_cfg.mup_base_width


def init_factor(path: str, w: float) -> float:
  """What μP multiplies the standard init of the parameter at `path` by."""
  return {'input': 1.0, 'vector': 1.0, 'hidden': 1 / math.sqrt(w), 'output': 1 / w}[role(path)]


def lr_factor(path: str, w: float) -> float:
  """What μP multiplies the learning rate of the parameter at `path` by (Adam)."""
  return {'input': 1.0, 'vector': 1.0, 'hidden': 1 / w, 'output': 1 / w}[role(path)]


def logit_multiplier(model_cfg) -> float:
  """The tied output projection's multiplier: logits / w."""
  return 1.0 / width_multiplier(model_cfg) if model_cfg.tie_embeddings else 1.0


def query_scale(model_cfg) -> float:
  """√(Dh_base / Dh): turns the kernels' 1/√Dh score scale into μP's √Dh_base / Dh."""
  if model_cfg.parametrization != 'mup':
    return 1.0
  head_dim = model_cfg.d_model // model_cfg.num_heads
  base_head_dim = model_cfg.mup_base_width / model_cfg.num_heads
  return math.sqrt(base_head_dim / head_dim)


def factors(params, model_cfg, which) -> dict:
  """A pytree like params of which(path, w) for every parameter."""
  w = width_multiplier(model_cfg)
  # Roles ignore the block: 'units/N/ffn/wi' (scanned) reads as 'blocks/N/ffn/wi'.
  name = lambda p: sharding.key_path_name(p).replace('units/', 'blocks/')
  return jax.tree_util.tree_map_with_path(lambda p, _: which(name(p), w), params)


def scale_init(params, model_cfg):
  """Standard-parametrization params -> μP's initialisation (identity at w = 1)."""
  return jax.tree.map(lambda p, f: p * f if f != 1.0 else p, params,
                      factors(params, model_cfg, init_factor))


def scale_by_learning_rates(scales) -> optax.GradientTransformation:
  """Multiplies each leaf's update by its learning-rate factor (a pytree like params):
  after AdamW, this gives each parameter its own μP learning rate."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)
