"""The mixture-of-experts FFN: a router, a bank of expert MLPs and a dispatcher; and
the registry of routers (config key moe.router).

Shape letters as in routers.py: G groups, S tokens per group, E experts, C capacity,
D d_model, F expert d_ff; and B sequences, L tokens per sequence, n sequences per group.

A routing group is n = moe.group_size / seq_len consecutive sequences of the batch
(one by default), so S = n * L and G = B / n. Its slots are filled position-major:
the n tokens at position 0, then the n at position 1, ... Capacity then binds on
earlier positions first, so a token's routing still depends only on tokens at the
same or earlier positions, and the model stays causal; the balance of larger groups
is what lowers the drop rate.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from flax import nnx

from routed.model import dispatch as dispatch_lib
from routed.model.erc import erc_loss
from routed.model.expert_choice import ExpertChoiceRouter
from routed.model.expert_parallel import dispatch_on_mesh
from routed.model.hash_router import HashRouter
from routed.model.layers import ACTIVATIONS, MLP, normal_param, wi_width
from routed.model.reinforce import ReinforceRouter
from routed.model.routers import SwitchRouter, TokenChoiceRouter
from routed.model.sbase import SBaseRouter
from routed.model.soft_moe import SoftRouter

# moe.router -> router class. Each has from_config(moe_cfg, d_model, rngs), is called
# as router(x, train=, rng=, token_ids=) -> (decision, losses, metrics), and declares
# is_causal(train, moe_cfg) and describe(moe_cfg, train).
ROUTERS = {
    'switch': SwitchRouter,
    'topk': TokenChoiceRouter,
    'expert_choice': ExpertChoiceRouter,
    'soft': SoftRouter,
    'sbase': SBaseRouter,
    'hash': HashRouter,
    'reinforce': ReinforceRouter,
}


# The routers whose expert count and choices fine-grained experts rescale (moe.granularity).
FINE_GRAINED = ('topk', 'expert_choice')


def fine_grained(moe_cfg, d_ff: int):
  """moe_cfg as an MoE layer is built from it: moe.granularity = m folded in.

  Fine-grained experts (DeepSeekMoE): each of the E experts of width F (moe.expert_d_ff,
  or d_ff) becomes m experts of width F / m, and a token makes m times as many choices
  (top_k * m; expert choice: the capacity factors * m, which are experts per token),
  so total and active expert parameters and FLOPs stay what they were, while the
  number of expert combinations a token can pick grows. Shared experts
  (moe.num_shared_experts) are counted at the fine width F / m. The result has
  granularity 1 and expert_d_ff set; the config itself is never changed.
  """
  m = moe_cfg.granularity
  resolved = copy.deepcopy(moe_cfg)
  resolved.expert_d_ff = (moe_cfg.expert_d_ff or d_ff) // m
  if m > 1:
    resolved.granularity = 1
    resolved.num_experts = moe_cfg.num_experts * m
    resolved.top_k = moe_cfg.top_k * m
    if moe_cfg.router == 'expert_choice':
      resolved.capacity_factor = moe_cfg.capacity_factor * m
      resolved.eval_capacity_factor = moe_cfg.eval_capacity_factor * m
  return resolved


def group_sequences(cfg) -> int:
  """n: sequences per routing group (moe.group_size tokens; 0 = one sequence)."""
  return max(1, cfg.moe.group_size // cfg.train.seq_len)


def to_groups(a, n: int):
  """[B, L, ...] -> [B / n, L * n, ...], position-major within each group of n rows."""
  b, l = a.shape[:2]
  a = a.reshape(b // n, n, l, *a.shape[2:])
  return jnp.swapaxes(a, 1, 2).reshape(b // n, l * n, *a.shape[3:])


def from_groups(a, n: int):
  """The inverse of to_groups: [G, S, ...] -> [G * n, S / n, ...]."""
  g, s = a.shape[:2]
  a = a.reshape(g, s // n, n, *a.shape[2:])
  return jnp.swapaxes(a, 1, 2).reshape(g * n, s // n, *a.shape[3:])


def is_causal(cfg, train: bool) -> bool:
  """Whether the model's output at position t depends only on tokens <= t."""
  return cfg.moe.every == 0 or ROUTERS[cfg.moe.router].is_causal(train, cfg.moe)


def routing_mode(cfg, train: bool) -> str:
  """One line saying how the model routes in training or evaluation."""
  if cfg.moe.every == 0:
    return 'dense model (no routing)'
  moe = cfg.moe
  causal = 'causal' if is_causal(cfg, train) else 'NON-CAUSAL: sees later tokens of the sequence'
  return (f"{'train' if train else 'eval'} routing {moe.router}: "
          f'{ROUTERS[moe.router].describe(moe, train)}; {causal}')


class Experts(nnx.Module):
  """E independent MLPs, applied to per-expert buffers: [E, ..., D] -> [E, ..., D].

  wi [E, D, F] ([E, D, 2F] for a gated activation: layers.swiglu), wo [E, F, D].
  """

  def __init__(self, num_experts: int, d_model: int, d_ff: int, *, activation: str,
               init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_experts = num_experts
    self.act = ACTIVATIONS[activation]
    self.dtype = dtype
    self.wi = normal_param(rngs, (num_experts, d_model, wi_width(activation, d_ff)), init_std,
                           param_dtype)
    self.wo = normal_param(rngs, (num_experts, d_ff, d_model), init_std, param_dtype)

  def __call__(self, buffers):
    shape = buffers.shape
    x = buffers.reshape(shape[0], -1, shape[-1]).astype(self.dtype)  # [E, N, D]
    h = self.act(jnp.einsum('end,edf->enf', x, self.wi[...].astype(self.dtype)))
    y = jnp.einsum('enf,efd->end', h, self.wo[...].astype(self.dtype))
    return y.reshape(shape)


class MoELayer(nnx.Module):
  """Drop-in replacement for the dense MLP: x [B, L, D] -> (y [B, L, D], aux).

  A routing group is `group_sequences` sequences, filled position-major (module
  docstring): capacity is per group, and with the causal routers a token's routing
  never depends on later positions.
  y = routed experts' output + shared experts' output; moe.num_shared_experts
  always-on experts (DeepSeekMoE) are one dense MLP of width num_shared * F, which
  equals their sum. With moe.erc_loss_weight > 0, training adds the expert-router
  coupling loss 'erc' (routed/model/erc.py).
  aux = {'losses': {name: value}, 'metrics': {name: array}}.
  """

  def __init__(self, moe_cfg, *, d_model: int, d_ff: int, activation: str, init_std: float,
               dtype, param_dtype, rngs: nnx.Rngs, group_sequences: int = 1,
               microbatches: int = 1):
    moe_cfg = fine_grained(moe_cfg, d_ff)
    expert_d_ff = moe_cfg.expert_d_ff
    if microbatches > 1:
      # moe.balance_shards slices the step's batch; a microbatch holds its share of
      # them, and is at least one slice of its own.
      moe_cfg.balance_shards = max(1, moe_cfg.balance_shards // microbatches)
    self.router = ROUTERS[moe_cfg.router].from_config(moe_cfg, d_model, rngs)
    self.experts = Experts(moe_cfg.num_experts, d_model, expert_d_ff, activation=activation,
                           init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.shared = MLP(d_model, moe_cfg.num_shared_experts * expert_d_ff,
                      activation=activation, init_std=init_std, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs) if moe_cfg.num_shared_experts else None
    self.erc_noise = moe_cfg.erc_noise if moe_cfg.erc_loss_weight > 0 else None
    self.dispatch = dispatch_lib.DISPATCHERS[moe_cfg.dispatch]
    self.dropless = moe_cfg.dispatch in dispatch_lib.DROPLESS
    self.group_sequences = group_sequences

  def __call__(self, x, *, train: bool, rng=None, token_ids=None, layer_state=None):
    n = self.group_sequences
    xg = to_groups(x, n)                                                  # [G, S, D]
    ids = None if token_ids is None else to_groups(token_ids, n)
    decision, losses, metrics = self.router(xg, train=train, rng=rng, token_ids=ids,
                                            layer_state=layer_state)
    # Per device under a mesh, exchanging tokens with the experts' devices.
    y = dispatch_on_mesh(self.dispatch, xg.astype(self.experts.dtype), decision, self.experts,
                         dropless=self.dropless)
    y = from_groups(y, n)
    if self.shared is not None:
      y = y + self.shared(x)[0]
    # Per-token loss entries ([G, S]: REINFORCE's log-probabilities) back to [B, L].
    losses = {k: from_groups(v, n) if v.ndim == 2 else v for k, v in losses.items()}
    if train and self.erc_noise is not None:
      # The expert-router coupling loss (routed/model/erc.py): E^2 proxy activations.
      losses['erc'], metrics['erc_coupled'] = erc_loss(
          self.router.kernel[...], self.experts.wi[...].astype(self.experts.dtype),
          self.experts.act, noise=self.erc_noise,
          rng=None if rng is None else jax.random.fold_in(rng, 0x3c))
    return y, {'losses': losses, 'metrics': metrics}
