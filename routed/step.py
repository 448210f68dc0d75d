"""The loss, the optimizer, and the jit-compiled train and eval steps.

Everything here is a pure function of pytrees, so it checkpoints, shards and resumes
without hidden state: params is the model's nnx.Param state as a pure dict,
opt_state is optax's. A batch is the data pipeline's dict of int32 [B, L + 1] arrays
(routed/data/records.py): `tokens` (inputs are tokens[:, :-1], targets tokens[:, 1:]),
`segment_ids` (0 marks padding, whose targets carry no loss) and `positions`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from routed import routing_state
from routed.model import mup
from routed.model.reinforce import reinforce_loss
from routed.sharding import batch_shards


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to peak * min_lr_ratio at the end."""
  peak = train_cfg.learning_rate
  warmup = min(train_cfg.warmup_steps, max(train_cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(train_cfg.steps, warmup + 1), end_value=peak * train_cfg.min_lr_ratio)


def make_optimizer(train_cfg, lr_scales=None) -> optax.GradientTransformation:
  """AdamW on the schedule, after global-norm clipping; lr_scales (a pytree like params
  of floats: μP's per-parameter learning rates, routed/model/mup.py) multiply each
  parameter's update."""
  # Decay matrices only: norm scales are 1-D and decaying them just fights the norm.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                      weight_decay=train_cfg.weight_decay, mask=decay_mask)
  parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
  parts.append(adamw)
  if lr_scales is not None:
    parts.append(mup.scale_by_learning_rates(lr_scales))
  return optax.chain(*parts) if len(parts) > 1 else adamw


def optimizer_for(cfg, vocab_size: int) -> optax.GradientTransformation:
  """The run's optimizer: make_optimizer, with μP's per-parameter learning rates under
  model.parametrization=mup."""
  if cfg.model.parametrization != 'mup':
    return make_optimizer(cfg.train)
  from routed.model.transformer import build_model  # pylint: disable=g-import-not-at-top
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: build_model(cfg, vocab_size, cfg.train.seed)), nnx.Param))
  return make_optimizer(cfg.train, mup.factors(shapes, cfg.model, mup.lr_factor))


def token_cross_entropy(logits, targets):
  """Next-token cross-entropy of each token in nats: float32 [B, L, V], [B, L] -> [B, L]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def token_batch(tokens):
  """A batch from bare token rows [B, L + 1]: each row one document, no padding (for
  benchmarks and tests that make their own tokens)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return {'tokens': tokens, 'segment_ids': jnp.ones_like(tokens), 'positions': positions}


def cross_entropy(logits, targets):
  """Mean next-token cross-entropy in nats; logits float32 [B, L, V], targets [B, L]."""
  return jnp.mean(token_cross_entropy(logits, targets))


def loss_weights(cfg) -> dict:
  """Auxiliary loss name -> its weight: the router losses (each averaged over MoE
  layers) and the Mixture-of-Depths causal-rule loss (mod_causal.py)."""
  moe = cfg.moe
  return {'balance': moe.aux_loss_weight, 'z': moe.z_loss_weight,
          'relu_l1': moe.relu_l1_weight, 'reinforce': moe.reinforce_weight,
          'erc': moe.erc_loss_weight,
          'mod_causal': cfg.mod.aux_loss_weight}


def make_loss_fn(graphdef, cfg):
  """loss(params, batch, rng, train) -> (total loss, metrics dict).

  The cross-entropy is the mean over target tokens that are not padding. Attention
  stays within documents, with rotary positions restarting at each, unless
  data.cross_document_attention.

  Router losses are scalars, except 'reinforce': the per-token log-probability
  [B, L] of a policy router's sampled choices, which becomes the REINFORCE loss with
  the per-token cross-entropy as negative reward (routed/model/reinforce.py); it is
  a training signal only, so evaluation leaves it out.
  """
  weights = loss_weights(cfg)

  def loss_fn(params, batch, rng, train: bool, num_targets=None, share: float = 1.0,
              layer_state=None):
    """num_targets: real targets of the whole step's batch when this is one of its
    microbatches (the cross-entropy is then this batch's sum over that count), and
    share its fraction of the rows, which the auxiliary losses are weighted by;
    layer_state: {MoE block: the routing state (routed/routing_state.py) and the
    step's expert counts} (accumulated_grads)."""
    model = nnx.merge(graphdef, params)
    tokens = batch['tokens']
    documents = {} if cfg.data.cross_document_attention else {
        'positions': batch['positions'][:, :-1], 'segment_ids': batch['segment_ids'][:, :-1]}
    logits, aux = model(tokens[:, :-1], train=train, rng=rng, layer_state=layer_state,
                        **documents)
    token_ce = token_cross_entropy(logits, tokens[:, 1:])
    real = (batch['segment_ids'][:, 1:] != 0).astype(token_ce.dtype)
    ce = jnp.sum(token_ce * real) / jnp.maximum(
        jnp.sum(real) if num_targets is None else num_targets, 1.0)
    loss = ce
    metrics = {'ce': ce}
    for name, value in aux['losses'].items():
      if name == 'reinforce':
        if not train:
          continue
        value = reinforce_loss(value, token_ce)
      loss = loss + share * weights[name] * value
      metrics[f'{name}_loss'] = value
    metrics['loss'] = loss
    metrics.update({f'moe/{k}': v for k, v in aux['metrics'].items()})
    return loss, metrics

  return loss_fn


def is_summed(metric: str) -> bool:
  """Whether a microbatch's metric is its part of the step's sum (the loss, the
  cross-entropy, expert counts); all other metrics are averaged over microbatches."""
  return metric in ('loss', 'ce') or metric.endswith('/choices')


def without_counts(metrics) -> dict:
  """The metrics worth logging. Expert counts (moe/layer{i}/choices [N], over the
  whole step) become moe/layer{i}/load_max and load_min: the most and the least loaded
  real expert's share of the choices as a multiple of the mean share 1/E (1.0 each at
  perfect balance; DeepSeek-V3's MaxVio is load_max - 1)."""
  out = {}
  for name, value in metrics.items():
    if not name.endswith('/choices'):
      out[name] = value
      continue
    layer = name[:-len('choices')]
    e = metrics[layer + 'expert_load'].shape[-1]   # real experts: the first E counts
    share = value[:e] / jnp.maximum(jnp.sum(value), 1.0)
    out[layer + 'load_max'] = e * jnp.max(share)
    out[layer + 'load_min'] = e * jnp.min(share)
  return out


def layer_choices(metrics) -> dict:
  """{block index: active choices per expert [N]} from loss_fn's metrics."""
  return {int(key.split('/')[1][len('layer'):]): value for key, value in metrics.items()
          if key.startswith('moe/layer') and key.endswith('/choices')}


def microbatch_rows(a, microbatches: int, shards: int):
  """[B, ...] -> [k, B / k, ...]: microbatch m holds the m-th k-th of every batch
  shard's rows, so each microbatch stays spread over all devices (no resharding) and
  on one device it is simply rows m * B / k ... (m + 1) * B / k - 1."""
  b = a.shape[0]
  a = a.reshape(shards, microbatches, b // (shards * microbatches), *a.shape[1:])
  return jnp.swapaxes(a, 0, 1).reshape(microbatches, b // microbatches, *a.shape[3:])


def accumulated_grads(loss_fn, params, batch, rng, microbatches: int,
                      balance_scope: str = 'micro', routing=None):
  """(grads, metrics) of loss_fn on the whole batch, computed in `microbatches` equal
  slices of its rows under lax.scan, so only one slice's activations are live.

  The result is one step on the whole batch: the cross-entropy of each slice is its
  sum over the real targets of the whole batch, and each auxiliary loss is weighted
  by the slice's share of the rows (each is a mean over equal slices). Router noise is
  drawn per slice (fold_in(rng, i)), so noisy routers draw other noise than at
  microbatches=1; REINFORCE's in-batch baseline is the slice's.

  The `global` balance scope needs each MoE layer's expert counts over the whole
  step before any slice's loss: a first pass runs the slices forward only (about a
  third of a step's FLOPs more) and sums the counts, which every slice's balance
  loss then uses. The `micro` scope (the default) uses each slice's own counts and
  needs no extra pass. routing: the routing state (routed/routing_state.py), which
  every slice's routers read.
  """
  routing = routing or {}
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, batch, rng, True, None, 1.0, routing_state.layer_inputs(routing))
  num_targets = jnp.sum(batch['segment_ids'][:, 1:] != 0).astype(jnp.float32)
  shards = batch_shards()  # 1 outside a mesh
  slices = jax.tree.map(lambda a: microbatch_rows(a, microbatches, shards), batch)

  micro_rng = lambda i: None if rng is None else jax.random.fold_in(rng, i)
  counts = None
  if balance_scope == 'global':
    def count(_, inputs):
      i, micro = inputs
      _, metrics = loss_fn(jax.lax.stop_gradient(params), micro, micro_rng(i), True,
                           layer_state=routing_state.layer_inputs(routing))
      return None, layer_choices(metrics)
    _, per_micro = jax.lax.scan(count, None, (jnp.arange(microbatches), slices))
    counts = jax.tree.map(lambda a: jnp.sum(a, axis=0), per_micro)

  def body(total, inputs):
    i, micro = inputs
    grads, metrics = grad_fn(params, micro, micro_rng(i), True, num_targets,
                             1.0 / microbatches, routing_state.layer_inputs(routing, counts))
    return jax.tree.map(jnp.add, total, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, metrics = jax.lax.scan(body, zeros, (jnp.arange(microbatches), slices))
  metrics = {k: jnp.sum(v, 0) if is_summed(k) else jnp.mean(v, 0)
             for k, v in metrics.items()}
  return grads, metrics


def make_train_step(graphdef, cfg, optimizer, layout=None):
  """Returns jit(train_step(params, opt_state, routing, batch, step) -> (params, opt_state,
  routing, metrics)); routing is the routing state (routed/routing_state.py), updated
  from the step's expert counts.

  Router noise for step s comes from fold_in(key(seed), s), so a resumed run draws the
  same noise as an uninterrupted one. train.microbatches > 1 accumulates the gradient
  over slices of the batch inside the step (accumulated_grads). layout
  (train_state.Layout): compile for its mesh with those input and output shardings
  (call and lower it inside `jax.set_mesh(layout.mesh)`, which the MoE layers read);
  None: one device.
  """
  loss_fn = make_loss_fn(graphdef, cfg)
  schedule = learning_rate_schedule(cfg.train)
  base_key = jax.random.key(cfg.train.seed)

  def train_step(params, opt_state, routing, batch, step):
    rng = jax.random.fold_in(base_key, step)
    grads, metrics = accumulated_grads(loss_fn, params, batch, rng, cfg.train.microbatches,
                                       cfg.moe.balance_scope, routing)
    new_routing = routing_state.update_state(cfg, routing, metrics, step)
    metrics = without_counts(metrics)
    metrics.update(routing_state.state_metrics(new_routing))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['learning_rate'] = schedule(step)
    # A step with a non-finite loss or gradient is not applied, so no bad value ever
    # reaches the state (or a checkpoint); the trainer stops or goes on (train.nonfinite).
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    keep = lambda new, old: jnp.where(finite, new, old)
    metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
    return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state),
            jax.tree.map(keep, new_routing, routing), metrics)

  if layout is None:
    return jax.jit(train_step, donate_argnums=(0, 1, 2))
  return jax.jit(train_step, donate_argnums=(0, 1, 2),
                 in_shardings=(layout.params, layout.opt_state, layout.replicated, layout.batch,
                               layout.replicated),
                 out_shardings=(layout.params, layout.opt_state, layout.replicated,
                                layout.replicated))


def make_eval_step(graphdef, cfg, layout=None):
  """Returns jit(eval_step(params, routing, batch) -> metrics), routing in eval mode
  with the routing state `routing` (routed/routing_state.py)."""
  loss_fn = make_loss_fn(graphdef, cfg)

  def eval_step(params, routing, batch):
    _, metrics = loss_fn(params, batch, None, False,
                         layer_state=routing_state.layer_inputs(routing))
    return without_counts(metrics)

  if layout is None:
    return jax.jit(eval_step)
  return jax.jit(eval_step, in_shardings=(layout.params, layout.replicated, layout.batch),
                 out_shardings=layout.replicated)
