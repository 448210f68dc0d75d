"""Routers decide; dispatchers execute. This module: the decision type, the shared
losses, the router base classes and the token-choice family (switch, topk).

A router looks at the tokens of each routing group and decides which token goes to
which expert, into which slot of that expert's buffer, with which combine weight. It
returns that decision plus its auxiliary losses and metrics; it never touches expert
parameters. A dispatcher (routed/model/dispatch.py) executes any decision, so every
router works with every dispatch backend.

Shape letters:
  G  routing groups (one sequence each)    S  tokens per group
  E  experts                               C  capacity: slots per expert per group
  K  choices recorded per token            D  d_model
  N  experts the router scores: E real experts, then the null (zero-compute) ones

Decision types. Every decision has `dense(num_experts) -> (dispatch, combine)`, both
float32 [G, S, E, C], which is all the einsum oracle needs:
  Routing      an assignment: for each of a token's K choices, an expert, a slot in
               that expert's buffer (>= C means not placed: dropped, inactive or
               null) and a combine weight. Token choice (K = top_k) and expert choice
               (K = E) both fit; index-based dispatch backends take this type.
  SoftRouting  dense soft weights (Soft MoE, routed/model/soft_moe.py).

The router modules: token choice here; expert_choice.py, soft_moe.py, sbase.py,
hash_router.py, reinforce.py beside it; the registry `ROUTERS` is in moe.py.

Losses (float32 scalars for one MoE layer; the model averages each over MoE layers,
routed/step.py weights them by the config):
  balance  N * sum_i f_i * P_i (Switch Transformer) over the N experts the router
           scores (null experts included). f_i = share of the layer's active choices (all k of them,
           counted before capacity drops, so sum_i f_i = 1) that picked expert i;
           P_i = mean router probability of expert i. 1.0 at perfect balance, for any k.
           With balance_shards > 1 the batch's G groups are viewed as that many
           slices (data-parallel shards or micro-batches): scope `micro` forms the
           loss per slice from that slice's f and P and averages the slices; `global`
           uses f from the counts summed over all slices ("Demons in the Detail")
           with each slice's own P, as a psum of counts across devices would.
  z        mean over tokens of logsumexp(logits)^2 (ST-MoE router z-loss).
  relu_l1  ReLU gates only (ReMoE): the load-balanced L1 norm of the gates.
  reinforce  NOT a scalar: float32 [G, S], log-probability of each token's sampled
           choice; routed/step.py turns it into the REINFORCE loss with the
           per-token cross-entropy (reinforce.py).
Metrics: expert_load [E] (f of the real experts: their share of all active choices,
  before capacity), dropped (fraction of real choices over capacity), entropy (mean
  entropy of the router distribution, nats); routers add their own (see each class).

Causality: `RouterBase.is_causal(train)` says whether a token's routing depends only
on itself and earlier tokens of its group, which autoregressive sampling needs;
`routed.model.moe.is_causal(cfg, train)` says it for a whole model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct


@struct.dataclass
class Routing:
  """Which slot of which expert each token's choices fill, and with which weight.

  expert: int32 [G, S, K]   expert of each choice, in [0, E)
  slot:   int32 [G, S, K]   position in that expert's buffer; a slot >= capacity
                            means the choice was not placed (dropped, inactive or a
                            null expert) and then has weight 0
  weight: float32 [G, S, K] combine weight of each choice
  capacity: C, slots per expert per group (static)
  dropless_weight: float32 [G, S, K] or None, for the dropless dispatch backends
                            (ragged, tiled, pallas), which ignore capacity: the
                            weight of each choice had nothing been dropped, 0 for a
                            choice that takes no expert (inactive or null). None:
                            the router drops nothing for capacity beyond its own
                            decision (expert choice), so dropless backends use weight.
  """
  expert: jax.Array
  slot: jax.Array
  weight: jax.Array
  capacity: int = struct.field(pytree_node=False)
  dropless_weight: jax.Array | None = None

  def dense(self, num_experts: int):
    """One-hot dispatch [G, S, E, C] (0/1) and combine [G, S, E, C] (weights) tensors."""
    expert = jax.nn.one_hot(self.expert, num_experts, dtype=jnp.float32)   # [G, S, K, E]
    slot = jax.nn.one_hot(self.slot, self.capacity, dtype=jnp.float32)     # [G, S, K, C]
    # one_hot of an out-of-range slot is all zeros: unplaced choices vanish here.
    dispatch = jnp.einsum('gske,gskc->gsec', expert, slot)
    combine = jnp.einsum('gske,gskc,gsk->gsec', expert, slot, self.weight.astype(jnp.float32))
    return dispatch, combine


def expert_capacity(group_size: int, num_experts: int, choices_per_token: int,
                    capacity_factor: float) -> int:
  """C = ceil(capacity_factor * S * K / E), at least 1 and at most S."""
  c = math.ceil(capacity_factor * group_size * choices_per_token / num_experts)
  return max(1, min(group_size, c))


def slots_in_order(expert_mask):
  """Slot of each (token, expert) choice, filling experts in token order.

  expert_mask: [G, S, K, E] one-hot of each choice (all zero for a choice that takes
  no slot). Returns int32 [G, S, K], the number of earlier choices (earlier tokens
  first, then lower k) of the same expert. Filling in position order keeps dropping
  causal: whether token t is dropped depends only on tokens <= t.
  """
  g, s, k, e = expert_mask.shape
  # Choice-major within a token: all k=0 choices of token t come before its k=1.
  flat = expert_mask.reshape(g, s * k, e)
  before = jnp.cumsum(flat, axis=1) - flat
  return jnp.sum(before * flat, axis=-1).reshape(g, s, k).astype(jnp.int32)


def balance_loss(probs, counts, *, num_shards: int = 1, scope: str = 'micro',
                 global_counts=None):
  """E * sum_i f_i * P_i; returns (loss, f over the whole batch [E]).

  probs [G, S, E]: router distribution of each token. counts [G, S, E]: how many of
  the token's active choices picked each expert (0/1 for distinct top-k choices).
  The G groups form `num_shards` equal slices; `micro` averages the per-slice losses,
  `global` uses the f of the whole batch in every slice (see the module docstring),
  or, given global_counts [E] (the counts of a whole step split into microbatches,
  routed/step.py), the f of those.
  """
  g, _, e = probs.shape
  if g % num_shards:
    raise ValueError(f'{g} routing groups do not split into {num_shards} balance shards')
  counts = jax.lax.stop_gradient(counts.astype(jnp.float32)).reshape(num_shards, -1, e)
  shard_counts = jnp.sum(counts, axis=1)                                   # [shards, E]
  p = jnp.mean(probs.reshape(num_shards, -1, e), axis=1)                   # [shards, E]
  total = jnp.sum(shard_counts)
  f_global = jnp.sum(shard_counts, axis=0) / jnp.maximum(total, 1.0)       # [E]
  if scope == 'global':
    f_step = f_global if global_counts is None else (
        jax.lax.stop_gradient(global_counts) / jnp.maximum(jnp.sum(global_counts), 1.0))
    f = jnp.broadcast_to(f_step, shard_counts.shape)
  elif scope == 'micro':
    f = shard_counts / jnp.maximum(jnp.sum(shard_counts, axis=-1, keepdims=True), 1.0)
  else:
    raise ValueError(f'unknown balance scope {scope!r}')
  return e * jnp.mean(jnp.sum(f * p, axis=-1)), f_global


def router_z_loss(logits):
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def entropy(probs, axis=-1):
  """Mean entropy in nats of the distributions along `axis`."""
  return jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-9)), axis=axis))


@dataclasses.dataclass(frozen=True)
class RouterCost:
  """What one MoE layer's routing costs, for routed/model/accounting.py.

  params:        parameters the router stores
  matmul_params: multiply-adds per token of the routing itself, counted as matmul
                 parameters (2 FLOPs each forward): the router projection, and for
                 Soft MoE also mixing tokens into slots and slots back into tokens
  expert_rows:   expert MLP applications per token in training (top-k: k; expert
                 choice: E * C / S; Soft MoE: E * P / S)
  """
  params: int
  matmul_params: int
  expert_rows: float


class RouterBase(nnx.Module):
  """What every router declares: causality, a one-line summary of its mode, its cost."""
  causal: bool = True   # causal in training and at evaluation
  summary: str = ''     # what it does, for the evaluation line

  @classmethod
  def cost(cls, moe_cfg, d_model: int, group_size: int) -> RouterCost:
    """A linear router scoring the E real and the null experts; top_k rows per token
    (an upper bound when top_p, a ReLU gate or null experts use fewer)."""
    del group_size
    scored = d_model * (moe_cfg.num_experts + moe_cfg.num_null_experts)
    return RouterCost(params=scored, matmul_params=scored, expert_rows=moe_cfg.top_k)

  @classmethod
  def is_causal(cls, train: bool, moe_cfg=None) -> bool:
    """Whether a token's routing depends only on itself and earlier tokens (under
    moe_cfg, for routers whose options change that)."""
    del train, moe_cfg
    return cls.causal

  @classmethod
  def describe(cls, moe_cfg, train: bool) -> str:
    """How this router routes under moe_cfg in training or evaluation, in a few words."""
    cf = moe_cfg.capacity_factor if train else moe_cfg.eval_capacity_factor
    return f'{cls.summary}, capacity factor {cf:g}'


class Router(RouterBase):
  """Base of the learned linear routers: a float32 map from tokens to N logits.

  Subclasses implement `route(logits, train, rng) -> (decision, losses, metrics)`.
  """

  def __init__(self, d_model: int, num_experts: int, *, capacity_factor: float,
               eval_capacity_factor: float, init_scale: float, jitter: float,
               rngs: nnx.Rngs, top_k: int = 1, num_null_experts: int = 0,
               balance_scope: str = 'micro', balance_shards: int = 1):
    self.num_experts = num_experts
    self.num_null_experts = num_null_experts
    self.top_k = top_k
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.jitter = jitter
    self.balance_scope = balance_scope
    self.balance_shards = balance_shards
    # Switch Transformer: a 10x smaller init scale made training far more stable.
    std = math.sqrt(init_scale / d_model)
    init = jax.nn.initializers.truncated_normal(stddev=std)
    self.kernel = nnx.Param(init(rngs.params(), (d_model, num_experts + num_null_experts),
                                 jnp.float32))

  @classmethod
  def from_config(cls, moe_cfg, d_model: int, rngs: nnx.Rngs):
    return cls(d_model, moe_cfg.num_experts, **cls.config_kwargs(moe_cfg), rngs=rngs)

  @classmethod
  def config_kwargs(cls, moe_cfg) -> dict:
    return dict(capacity_factor=moe_cfg.capacity_factor,
                eval_capacity_factor=moe_cfg.eval_capacity_factor,
                init_scale=moe_cfg.router_init_scale, jitter=moe_cfg.jitter,
                balance_scope=moe_cfg.balance_scope, balance_shards=moe_cfg.balance_shards)

  def __call__(self, x, *, train: bool, rng=None, token_ids=None, layer_state=None):
    """x [G, S, D] -> (decision, losses, metrics). Training needs rng when jitter > 0
    or the router samples. layer_state: this layer's step-level inputs, a dict with
    any of 'counts' [N] (the step's expert counts, for the `global` balance scope under
    microbatches: balance_loss) and the routing state of routed/routing_state.py
    ('bias' [N], 'threshold' [E])."""
    del token_ids  # learned routers look at the tokens' representations only
    x, route_rng = self.inputs(x, train, rng)
    return self.route(x @ self.kernel[...], train, rng=route_rng, layer_state=layer_state)

  def inputs(self, x, train: bool, rng):
    """x [G, S, D] -> (float32 router inputs [G, S, D], jittered in training; rng for route)."""
    jitter_rng = route_rng = None
    if rng is not None:
      jitter_rng, route_rng = jax.random.split(rng)
    # Router math in float32: bfloat16 routers diverged in the Switch paper.
    x = x.astype(jnp.float32)
    if train and self.jitter > 0:
      x = x * jax.random.uniform(jitter_rng, x.shape, jnp.float32, 1 - self.jitter,
                                 1 + self.jitter)
    return x, route_rng

  def capacity(self, group_size: int, train: bool) -> int:
    cf = self.capacity_factor if train else self.eval_capacity_factor
    return expert_capacity(group_size, self.num_experts + self.num_null_experts, self.top_k, cf)

  def place(self, expert, weight, active, capacity: int):
    """Places token choices into expert buffers in position order.

    expert int [G, S, K] in [0, N); weight [G, S, K]; active bool [G, S, K] (choices
    that count). Choices of null experts (>= E) and inactive ones take no slot and get
    weight 0. Returns (Routing, real [G, S, K] bool, kept [G, S, K] bool).
    """
    e = self.num_experts
    real = active & (expert < e)
    slot = slots_in_order(jax.nn.one_hot(expert, e, dtype=jnp.int32) * real[..., None])
    slot = jnp.where(real, slot, capacity)
    kept = real & (slot < capacity)
    routing = Routing(expert=jnp.where(real, expert, 0).astype(jnp.int32), slot=slot,
                      weight=jnp.where(kept, weight, 0.0).astype(jnp.float32),
                      capacity=capacity,
                      dropless_weight=jnp.where(real, weight, 0.0).astype(jnp.float32))
    return routing, real, kept

  def choice_stats(self, probs, expert, active, real, kept, layer_state=None):
    """Balance loss and the common metrics of placed choices (see module docstring)."""
    n = self.num_experts + self.num_null_experts
    counts = jnp.sum(jax.nn.one_hot(expert, n, dtype=jnp.float32) * active[..., None], axis=2)
    balance, load = balance_loss(probs, counts, num_shards=self.balance_shards,
                                 scope=self.balance_scope,
                                 global_counts=(layer_state or {}).get('counts'))
    num_real = jnp.sum(real.astype(jnp.float32))
    metrics = {'expert_load': load[:self.num_experts],
               'dropped': 1.0 - jnp.sum(kept.astype(jnp.float32)) / jnp.maximum(num_real, 1.0),
               'entropy': entropy(probs),
               # Active choices per expert (null ones included) over the batch: what
               # the `global` scope and the aux-loss-free bias sum over a step's
               # microbatches, and the step's load_max / load_min (routed/step.py).
               'choices': jnp.sum(counts, axis=(0, 1))}
    if self.num_null_experts:
      metrics['null'] = jnp.sum(load[self.num_experts:])
    return balance, metrics


def softmax_gate(logits):
  probs = jax.nn.softmax(logits, axis=-1)
  return probs, probs


def sigmoid_gate(logits):
  # Normalised sigmoid (DeepSeek): independent sigmoid scores, divided by their sum
  # so that they form a distribution; with renormalize, s_i / sum of chosen s_j.
  scores = jax.nn.sigmoid(logits)
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  return probs, probs


def relu_gate(logits):
  # ReMoE: the gate is ReLU(logits) itself, unnormalised; zero gates are off.
  gates = jax.nn.relu(logits)
  total = jnp.sum(gates, axis=-1, keepdims=True)
  return gates, gates / jnp.maximum(total, 1e-9)


# gate name -> logits [..., N] -> (gate values [..., N] >= 0, distribution [..., N]);
# the distribution feeds the balance loss, entropy and top-p; experts are chosen by
# gate value, which orders them as the distribution does.
GATES = {'softmax': softmax_gate, 'sigmoid': sigmoid_gate, 'relu': relu_gate}


class TokenChoiceRouter(Router):
  """Token choice (GShard top-k): each token picks up to k experts by gate value.

  The choice is a gate function (moe.gate: softmax | normalised sigmoid | ReLU) and a
  selection: the k = moe.top_k highest gates, of which a choice is active when
    - top_p > 0: the probability mass of the token's earlier (higher) choices is
      below top_p ("Harder Tasks Need More Experts"), so k varies per token, capped
      at top_k;
    - gate relu: its gate is positive (ReMoE), again capped at top_k.
  Combine weight = the gate value of the choice; with renormalize, divided by the sum
  over the token's active choices (GShard). A choice of a null expert (moe.
  num_null_experts, AdaMoE) keeps its share of that sum but outputs zero and costs no
  compute. Experts take choices in position order until their C slots are full,
  C = ceil(cf * S * top_k / (E + nulls)); later ones are dropped (residual only).
  Causal in training and evaluation.

  With a selection bias b [N] in layer_state (aux-loss-free balancing, moe.
  bias_update_rate > 0; softmax and sigmoid gates), the k experts of highest gate + b
  are chosen and each choice still weighs its gate value.

  Combine weights per token: non-negative; softmax/sigmoid sum to <= 1, exactly 1
  with renormalize when nothing is dropped or null; relu gates are unnormalised.
  Extra metrics: experts_per_token (active real choices per token, before capacity),
  null (share of choices on null experts, when there are null experts).
  Extra loss relu_l1 (relu gate): E' * sum_i f_i * mean_t gate_i(t) (ReMoE's
  load-balanced L1), applied only while the batch's mean active choices per token
  exceed relu_target (a stateless stand-in for ReMoE's adaptive coefficient).
  """
  causal = True
  fixed_top_k = 0  # > 0: this many choices whatever moe.top_k says

  def __init__(self, d_model: int, num_experts: int, *, top_k: int = 1,
               gate: str = 'softmax', renormalize: bool = False, top_p: float = 0.0,
               relu_target: float = 1.0, **kwargs):
    super().__init__(d_model, num_experts, top_k=self.fixed_top_k or top_k, **kwargs)
    self.gate = gate
    self.renormalize = renormalize
    self.top_p = top_p
    self.relu_target = relu_target

  @classmethod
  def config_kwargs(cls, moe_cfg) -> dict:
    return dict(super().config_kwargs(moe_cfg), top_k=moe_cfg.top_k, gate=moe_cfg.gate,
                renormalize=moe_cfg.renormalize, top_p=moe_cfg.top_p,
                relu_target=moe_cfg.relu_target, num_null_experts=moe_cfg.num_null_experts)

  @classmethod
  def describe(cls, moe_cfg, train: bool) -> str:
    k = cls.fixed_top_k or moe_cfg.top_k
    options = [f'top-{k} token choice', f'{moe_cfg.gate} gate']
    if moe_cfg.renormalize:
      options.append('renormalized')
    if moe_cfg.top_p:
      options.append(f'top-p {moe_cfg.top_p:g}')
    if moe_cfg.num_null_experts:
      options.append(f'{moe_cfg.num_null_experts} null experts')
    cf = moe_cfg.capacity_factor if train else moe_cfg.eval_capacity_factor
    return ', '.join(options) + f', capacity factor {cf:g}'

  def route(self, logits, train: bool, rng=None, layer_state=None):
    del rng  # deterministic
    gates, probs = GATES[self.gate](logits)                        # [G, S, N] each
    bias = (layer_state or {}).get('bias')
    if bias is None:
      values, expert = jax.lax.top_k(gates, self.top_k)            # [G, S, K], descending
    else:
      # Auxiliary-loss-free balancing (DeepSeek-V3): the bias [N] shifts which experts
      # are chosen, never the weight a choice gets (routed/routing_state.py).
      _, expert = jax.lax.top_k(gates + jax.lax.stop_gradient(bias), self.top_k)
      values = jnp.take_along_axis(gates, expert, axis=-1)
    active = jnp.ones(values.shape, bool)
    if self.top_p > 0:
      chosen = jnp.take_along_axis(probs, expert, axis=-1)
      active &= (jnp.cumsum(chosen, axis=-1) - chosen) < self.top_p
    if self.gate == 'relu':
      active &= values > 0
    weight = jnp.where(active, values, 0.0)
    if self.renormalize:
      weight = weight / jnp.maximum(jnp.sum(weight, axis=-1, keepdims=True), 1e-9)
    routing, real, kept = self.place(expert, weight, active, self.capacity(logits.shape[1], train))
    balance, metrics = self.choice_stats(probs, expert, active, real, kept, layer_state)
    metrics['experts_per_token'] = jnp.mean(jnp.sum(real.astype(jnp.float32), axis=-1))
    losses = {'balance': balance, 'z': router_z_loss(logits)}
    if self.gate == 'relu':
      n = gates.shape[-1]
      counts = jnp.sum(jax.nn.one_hot(expert, n) * active[..., None], axis=(0, 1, 2))
      f = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts), 1.0))
      l1 = n * jnp.sum(f * jnp.mean(gates, axis=(0, 1)))
      over = jnp.mean(jnp.sum(active.astype(jnp.float32), axis=-1)) > self.relu_target
      losses['relu_l1'] = jnp.where(over, l1, 0.0)
    return routing, losses, metrics


class SwitchRouter(TokenChoiceRouter):
  """Top-1 token choice with expert capacity (Switch Transformer).

  Each token goes to its argmax expert with weight = its router probability (< 1, so
  the router gets a gradient through the weight); an expert takes tokens in position
  order until its C slots are full, and later tokens are dropped (they pass through
  on the residual). The gate options of TokenChoiceRouter apply, with k = 1. Causal.
  """
  fixed_top_k = 1
