"""The routing state: what routers keep from step to step outside the optimizer.

Two options learn from each training step's routing decisions instead of from
gradients, so their values are neither parameters nor optimizer state:

  bias [N]       aux-loss-free balancing (DeepSeek-V3; moe.bias_update_rate = u > 0):
                 added to the gate values of the token-choice routers (switch, topk;
                 softmax and sigmoid gates) when they choose experts, never to the
                 weight a choice gets. After every applied training step
                     b_i <- b_i + u * sign(mean_j c_j - c_i)
                 where c [N] counts the layer's active choices over the whole global
                 batch: all data shards (the counts are a global-view sum under the
                 mesh) and all train.microbatches of the step (summed by routed/step.py
                 before the update). An overloaded expert's bias falls by u, an
                 underloaded one's rises by u, a balanced one's stays.
  threshold [E]  expert choice's causal rule (moe.causal_rule = threshold,
                 routed/model/expert_choice.py): an exponential moving average, with
                 rate moe.threshold_ema, of the score of the C-th token each expert
                 took in training (averaged over routing groups). At evaluation and
                 sampling a token goes to every expert whose threshold its score
                 exceeds, which depends on that token alone.

N counts the experts a router scores: the E real ones, then the null ones. The state is
a pure dict {MoE block index: {name: float32 array}}, empty when no option needs it.
It is replicated on the mesh (a few numbers per layer), saved in every checkpoint
beside params and opt_state (routed/checkpoint.py) and so restored onto any mesh, and
left as it was by a step that is not applied (a non-finite loss or gradient).
"""

from __future__ import annotations

import jax.numpy as jnp

from routed.model.moe import fine_grained
from routed.model.transformer import moe_blocks


def uses_bias(cfg) -> bool:
  return cfg.moe.every > 0 and cfg.moe.bias_update_rate > 0


def uses_threshold(cfg) -> bool:
  return (cfg.moe.every > 0 and cfg.moe.router == 'expert_choice'
          and cfg.moe.causal_rule == 'threshold')


def init_state(cfg) -> dict:
  """The routing state before the first step: zero biases, zero thresholds."""
  state = {}
  moe = fine_grained(cfg.moe, cfg.model.d_ff)   # the experts the layers really have
  scored = moe.num_experts + moe.num_null_experts
  for i in [i for i, is_moe in enumerate(moe_blocks(cfg)) if is_moe]:
    layer = {}
    if uses_bias(cfg):
      layer['bias'] = jnp.zeros((scored,), jnp.float32)
    if uses_threshold(cfg):
      layer['threshold'] = jnp.zeros((moe.num_experts,), jnp.float32)
    if layer:
      state[i] = layer
  return state


def bias_step(bias, counts, rate: float):
  """One aux-loss-free update: bias [N] + rate * sign(mean(counts) - counts)."""
  counts = counts.astype(jnp.float32)
  return bias + rate * jnp.sign(jnp.mean(counts) - counts)


def update_state(cfg, state: dict, metrics: dict, step) -> dict:
  """The state after training step `step` (from 0), from that step's metrics:
  'moe/layer{i}/choices' (active choices per expert over the global batch, summed over
  microbatches) and 'moe/layer{i}/top_c_score' (expert choice: the C-th taken score
  per expert). The thresholds are a plain running mean over the first 1 / rate steps,
  so their zero start is forgotten at once, then a moving average."""
  new = {}
  for i, layer in state.items():
    layer = dict(layer)
    if 'bias' in layer:
      layer['bias'] = bias_step(layer['bias'], metrics[f'moe/layer{i}/choices'],
                                cfg.moe.bias_update_rate)
    if 'threshold' in layer:
      rate = jnp.maximum(cfg.moe.threshold_ema, 1.0 / (step + 1.0))
      layer['threshold'] = ((1 - rate) * layer['threshold']
                            + rate * metrics[f'moe/layer{i}/top_c_score'])
    new[i] = layer
  return new


def layer_inputs(state: dict, counts: dict | None = None) -> dict:
  """{block index: the dict a layer's router reads}: the routing state and, for the
  `global` balance scope under microbatches, the step's expert counts {i: [N]}."""
  inputs = {i: dict(layer) for i, layer in state.items()}
  for i, c in (counts or {}).items():
    inputs.setdefault(i, {})['counts'] = c
  return inputs


def without_thresholds(state: dict) -> dict:
  """The state with expert choice's thresholds left out: evaluation then routes by
  top-C selection, the non-causal rule of training (to report what causality costs)."""
  return {i: {k: v for k, v in layer.items() if k != 'threshold'} for i, layer in state.items()}


def state_metrics(state: dict) -> dict:
  """What the logs show of the state: moe/layer{i}/bias and moe/layer{i}/threshold."""
  return {f'moe/layer{i}/{name}': value for i, layer in state.items()
          for name, value in layer.items()}
