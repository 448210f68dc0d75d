"""Checks a whole config before anything heavy starts.

Every problem is reported as a `UsageError` whose message is one line naming the
config key (or path) and what is wrong; the entry points print it and exit with 2.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

from routed.cli import UsageError
from routed.model.attention import ATTENTION
from routed.model.dispatch import DISPATCHERS
from routed.model.layers import ACTIVATIONS
from routed.model.moe import ROUTERS
from routed.model.transformer import DTYPES, REMAT


def require(condition: bool, key: str, problem: str) -> None:
  if not condition:
    raise UsageError(f'config key {key}: {problem}')


def one_of(value, choices, key: str) -> None:
  require(value in choices, key, f'{value!r} is not one of {", ".join(sorted(choices))}')


def validate_model(cfg) -> None:
  m, moe = cfg.model, cfg.moe
  for key in ('d_model', 'num_heads', 'num_layers', 'd_ff'):
    require(m[key] >= 1, f'model.{key}', f'must be >= 1, got {m[key]}')
  require(m.d_model % m.num_heads == 0, 'model.num_heads',
          f'{m.num_heads} does not divide model.d_model={m.d_model}')
  require((m.d_model // m.num_heads) % 2 == 0, 'model.num_heads',
          f'head width d_model/num_heads = {m.d_model // m.num_heads} must be even (rotary)')
  require(m.num_kv_heads >= 0 and (m.num_kv_heads == 0 or m.num_heads % m.num_kv_heads == 0),
          'model.num_kv_heads', f'{m.num_kv_heads} does not divide model.num_heads='
          f'{m.num_heads} (0 = as many as num_heads)')
  one_of(m.activation, ACTIVATIONS, 'model.activation')
  one_of(m.attention, ATTENTION, 'model.attention')
  one_of(m.remat, REMAT, 'model.remat')
  if m.scan_layers:
    from routed.model.scan import block_period  # pylint: disable=g-import-not-at-top
    period = block_period(cfg)
    require(m.num_layers % period == 0, 'model.scan_layers',
            f'the block pattern repeats every {period} blocks (moe.every, mod.every), which '
            f'does not divide model.num_layers={m.num_layers}')
  one_of(m.parametrization, ('standard', 'mup'), 'model.parametrization')
  if m.parametrization == 'mup':
    require(0 < m.mup_base_width <= m.d_model, 'model.mup_base_width',
            f'must be in (0, model.d_model={m.d_model}] (μP scales up from the base width), '
            f'got {m.mup_base_width}')
    require(m.mup_base_width % m.num_heads == 0, 'model.mup_base_width',
            f'{m.mup_base_width} does not split into model.num_heads={m.num_heads} heads')
  one_of(m.param_dtype, DTYPES, 'model.param_dtype')
  one_of(m.compute_dtype, DTYPES, 'model.compute_dtype')
  require(m.init_std > 0, 'model.init_std', f'must be > 0, got {m.init_std}')
  require(m.rope_base > 0, 'model.rope_base', f'must be > 0, got {m.rope_base}')
  require(m.norm_eps > 0, 'model.norm_eps', f'must be > 0, got {m.norm_eps}')
  require(moe.num_experts >= 1, 'moe.num_experts', f'must be >= 1, got {moe.num_experts}')
  require(moe.every >= 0, 'moe.every', f'must be >= 0 (0 = dense model), got {moe.every}')
  one_of(moe.router, ROUTERS, 'moe.router')
  one_of(moe.dispatch, DISPATCHERS, 'moe.dispatch')
  validate_granularity(moe, m.d_ff)
  # The routing options as the layers see them: fine-grained experts multiply top_k.
  from routed.model.moe import fine_grained  # pylint: disable=g-import-not-at-top
  validate_routing(fine_grained(moe, m.d_ff))
  validate_mod(cfg)
  require(moe.capacity_factor > 0, 'moe.capacity_factor', f'must be > 0, got {moe.capacity_factor}')
  require(moe.eval_capacity_factor > 0, 'moe.eval_capacity_factor',
          f'must be > 0, got {moe.eval_capacity_factor}')
  for key in ('aux_loss_weight', 'z_loss_weight', 'jitter'):
    require(moe[key] >= 0, f'moe.{key}', f'must be >= 0, got {moe[key]}')
  require(moe.jitter < 1, 'moe.jitter', f'must be < 1, got {moe.jitter}')
  require(moe.router_init_scale > 0, 'moe.router_init_scale',
          f'must be > 0, got {moe.router_init_scale}')


def validate_mod(cfg) -> None:
  """Mixture-of-Depths keys (routed/model/mod.py)."""
  from routed.model.mod_causal import CAUSAL_RULES  # pylint: disable=g-import-not-at-top
  mod = cfg.mod
  require(mod.every >= 1, 'mod.every', f'must be >= 1, got {mod.every}')
  require(0 < mod.capacity <= 1, 'mod.capacity', f'must be in (0, 1], got {mod.capacity}')
  require(mod.capacity <= mod.eval_capacity <= 1, 'mod.eval_capacity',
          f'must be in [mod.capacity={mod.capacity}, 1], got {mod.eval_capacity}')
  one_of(mod.causal_rule, CAUSAL_RULES, 'mod.causal_rule')
  require(mod.aux_loss_weight >= 0, 'mod.aux_loss_weight', f'must be >= 0, got {mod.aux_loss_weight}')
  require(mod.predictor_d_ff >= 1, 'mod.predictor_d_ff', f'must be >= 1, got {mod.predictor_d_ff}')
  require(mod.router_init_scale > 0, 'mod.router_init_scale',
          f'must be > 0, got {mod.router_init_scale}')
  # A REINFORCE router's per-token loss is paired with the full sequence's cross-entropy.
  staged = mod.enabled and cfg.moe.every > 0 and any(
      (i + 1) % mod.every == 0 and (i + 1) % cfg.moe.every == 0
      for i in range(cfg.model.num_layers))
  require(not (staged and cfg.moe.router == 'reinforce'), 'moe.router',
          'reinforce cannot sit inside a Mixture-of-Depths block (staged MoDE)')


TOKEN_CHOICE = ('switch', 'topk')  # the routers that take the gating options


def validate_routing(moe) -> None:
  require(moe.num_null_experts >= 0, 'moe.num_null_experts',
          f'must be >= 0, got {moe.num_null_experts}')
  choosable = moe.num_experts + moe.num_null_experts
  require(1 <= moe.top_k <= choosable, 'moe.top_k',
          f'must be between 1 and moe.num_experts + moe.num_null_experts = {choosable}, '
          f'got {moe.top_k}')
  require(moe.router != 'switch' or moe.top_k == 1, 'moe.top_k',
          f'switch routes each token to 1 expert, got {moe.top_k} (use moe.router=topk)')
  one_of(moe.gate, ('softmax', 'sigmoid', 'relu'), 'moe.gate')
  tc = moe.router in TOKEN_CHOICE
  for key, off in (('gate', 'softmax'), ('renormalize', False), ('num_null_experts', 0),
                   ('top_p', 0.0)):
    require(tc or moe[key] == off, f'moe.{key}',
            f'is a token-choice option (moe.router=switch or topk), not for {moe.router}')
  require(0 <= moe.top_p <= 1, 'moe.top_p', f'must be in [0, 1] (0 = off), got {moe.top_p}')
  require(not moe.renormalize or moe.top_k > 1, 'moe.renormalize',
          'with top_k=1 every combine weight would be 1 and the router would get no gradient')
  require(not moe.renormalize or moe.gate != 'relu', 'moe.renormalize',
          'ReLU gates are not normalised (moe.gate=relu)')
  require(moe.bias_update_rate >= 0, 'moe.bias_update_rate',
          f'must be >= 0 (0 = off), got {moe.bias_update_rate}')
  require(moe.bias_update_rate == 0 or (tc and moe.gate in ('softmax', 'sigmoid')),
          'moe.bias_update_rate', 'aux-loss-free balancing needs a token-choice router '
          f'(switch, topk) with a softmax or sigmoid gate, not {moe.router} with {moe.gate}')
  require(moe.relu_l1_weight >= 0, 'moe.relu_l1_weight', f'must be >= 0, got {moe.relu_l1_weight}')
  require(0 < moe.relu_target <= moe.top_k, 'moe.relu_target',
          f'must be in (0, moe.top_k={moe.top_k}], got {moe.relu_target}')
  one_of(moe.balance_scope, ('micro', 'global'), 'moe.balance_scope')
  require(moe.balance_shards >= 1, 'moe.balance_shards', f'must be >= 1, got {moe.balance_shards}')
  require(moe.num_shared_experts >= 0, 'moe.num_shared_experts',
          f'must be >= 0, got {moe.num_shared_experts}')
  require(moe.expert_d_ff >= 0, 'moe.expert_d_ff',
          f'must be >= 0 (0 = model.d_ff), got {moe.expert_d_ff}')
  one_of(moe.causal_rule, ('none', 'threshold'), 'moe.causal_rule')
  require(moe.causal_rule == 'none' or moe.router == 'expert_choice', 'moe.causal_rule',
          f'is an expert-choice option (moe.router=expert_choice), not for {moe.router}')
  require(0 < moe.threshold_ema <= 1, 'moe.threshold_ema',
          f'must be in (0, 1], got {moe.threshold_ema}')
  require(0 <= moe.eval_max_experts <= moe.num_experts, 'moe.eval_max_experts',
          f'must be in [0, moe.num_experts={moe.num_experts}] (0 = all), got '
          f'{moe.eval_max_experts}')
  require(moe.erc_loss_weight >= 0, 'moe.erc_loss_weight',
          f'must be >= 0 (0 = off), got {moe.erc_loss_weight}')
  require(moe.erc_loss_weight == 0 or moe.router not in ('soft', 'hash'), 'moe.erc_loss_weight',
          f'the ERC loss couples experts to a linear router kernel, which {moe.router} has not')
  require(0 <= moe.erc_noise < 1, 'moe.erc_noise', f'must be in [0, 1), got {moe.erc_noise}')
  require(moe.slots_per_expert >= 1, 'moe.slots_per_expert',
          f'must be >= 1, got {moe.slots_per_expert}')
  require(moe.sinkhorn_iters >= 1, 'moe.sinkhorn_iters', f'must be >= 1, got {moe.sinkhorn_iters}')
  require(moe.reinforce_weight >= 0, 'moe.reinforce_weight',
          f'must be >= 0, got {moe.reinforce_weight}')


def validate_granularity(moe, d_ff: int) -> None:
  """moe.granularity (fine-grained experts, routed/model/moe.py: fine_grained)."""
  from routed.model.moe import FINE_GRAINED  # pylint: disable=g-import-not-at-top
  m, width = moe.granularity, moe.expert_d_ff or d_ff
  require(m >= 1, 'moe.granularity', f'must be >= 1, got {m}')
  require(width % m == 0, 'moe.granularity',
          f'{m} does not divide the expert width {width} (moe.expert_d_ff, or model.d_ff)')
  require(m == 1 or moe.router in FINE_GRAINED, 'moe.granularity',
          f'fine-grained experts need a router that takes m times the choices '
          f'({", ".join(FINE_GRAINED)}), not {moe.router}')


def validate_training(cfg) -> None:
  t = cfg.train
  require(t.steps >= 1, 'train.steps', f'must be >= 1, got {t.steps}')
  require(t.batch_size >= 1, 'train.batch_size', f'must be >= 1, got {t.batch_size}')
  require(t.seq_len >= 2, 'train.seq_len', f'must be >= 2, got {t.seq_len}')
  require(t.learning_rate > 0, 'train.learning_rate', f'must be > 0, got {t.learning_rate}')
  require(t.warmup_steps >= 0, 'train.warmup_steps', f'must be >= 0, got {t.warmup_steps}')
  require(0 <= t.min_lr_ratio <= 1, 'train.min_lr_ratio', f'must be in [0, 1], got {t.min_lr_ratio}')
  require(t.weight_decay >= 0, 'train.weight_decay', f'must be >= 0, got {t.weight_decay}')
  require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, 'train.b1/b2', f'must be in [0, 1), got {t.b1}, {t.b2}')
  require(t.grad_clip >= 0, 'train.grad_clip', f'must be >= 0, got {t.grad_clip}')
  require(t.log_every >= 1, 'train.log_every', f'must be >= 1, got {t.log_every}')
  require(t.peak_flops >= 0, 'train.peak_flops', f'must be >= 0, got {t.peak_flops}')
  one_of(t.nonfinite, ('stop', 'skip'), 'train.nonfinite')
  require(cfg.eval.every_steps >= 0, 'eval.every_steps', f'must be >= 0, got {cfg.eval.every_steps}')
  require(cfg.eval.num_batches >= 1, 'eval.num_batches', f'must be >= 1, got {cfg.eval.num_batches}')
  require(cfg.eval.batch_size >= 0, 'eval.batch_size', f'must be >= 0, got {cfg.eval.batch_size}')
  k = t.microbatches
  require(k >= 1 and t.batch_size % k == 0, 'train.microbatches',
          f'must be >= 1 and divide train.batch_size={t.batch_size}, got {k}')
  require(k == 1 or cfg.moe.balance_shards == 1 or cfg.moe.balance_shards % k == 0,
          'moe.balance_shards', f'{cfg.moe.balance_shards} slices of the batch do not split '
          f'over train.microbatches={k} (use 1 or a multiple of {k})')
  group = cfg.moe.group_size
  require(group >= 0 and group % t.seq_len == 0, 'moe.group_size',
          f'must be a multiple of train.seq_len={t.seq_len} (0 = one sequence), got {group}')
  n = max(1, group // t.seq_len)  # sequences per routing group
  # What one forward pass sees: a microbatch in training, the whole eval batch; the MoE
  # layers view either as balance_shards / microbatches slices (routed/model/moe.py).
  shards = max(1, cfg.moe.balance_shards // k)
  eval_size = cfg.eval.batch_size or t.batch_size
  for what, size in (
      (f'the {t.batch_size // k} sequences of a train step' + (' microbatch' if k > 1 else ''),
       t.batch_size // k), (f'the {eval_size} sequences of an eval batch', eval_size)):
    require(size % n == 0, 'moe.group_size', f'{what} do not form groups of {n} sequences')
    require(size // n % shards == 0, 'moe.balance_shards',
            f'{what} form {size // n} routing groups, which {shards} slices do not divide')
  require(cfg.checkpoint.every_steps >= 1, 'checkpoint.every_steps',
          f'must be >= 1, got {cfg.checkpoint.every_steps}')
  require(cfg.checkpoint.keep >= 1, 'checkpoint.keep', f'must be >= 1, got {cfg.checkpoint.keep}')


def validate_init(cfg) -> None:
  """init.* (routed/init_from.py); the checkpoint's contents are checked when read."""
  init = cfg.init
  path = init.from_checkpoint
  require(not path or '://' in path or os.path.isdir(path), 'init.from_checkpoint',
          f'{path} is not a directory')
  require(not init.upcycle or path, 'init.upcycle', 'needs init.from_checkpoint (a dense run)')
  require(not init.upcycle or cfg.moe.every > 0, 'init.upcycle',
          'upcycles into MoE layers, but moe.every=0 is a dense model')
  require(init.upcycle_noise >= 0, 'init.upcycle_noise', f'must be >= 0, got {init.upcycle_noise}')
  require(init.data_offset >= 0, 'init.data_offset', f'must be >= 0, got {init.data_offset}')


def validate_workdir(workdir: str) -> None:
  """A local workdir must be a directory we can write (probed by writing a file, which
  also catches read-only filesystems); a gs:// one is checked when first written."""
  if '://' in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f'--workdir: {workdir} exists and is not a directory')
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f'--workdir: {parent} is not a directory')
  target = workdir if os.path.exists(workdir) else parent
  try:
    with tempfile.TemporaryFile(dir=target) as probe:
      probe.write(b'routed')
      probe.flush()
  except OSError as e:
    raise UsageError(f'--workdir: {target} is not writable ({e.strerror or e})') from None


def validate_resume_layout(cfg, workdir: str) -> None:
  """A workdir's checkpoints hold parameters in the layout of the config that wrote
  them (config.json): per block, or stacked by model.scan_layers. Resuming in the other
  layout is refused before anything is read, so the checkpoints stay as they are."""
  if '://' in workdir:
    return
  saved = os.path.join(workdir, 'config.json')
  if not (os.path.isfile(saved) and os.path.isdir(os.path.join(workdir, 'checkpoints'))):
    return
  try:
    with open(saved) as f:
      was = bool(json.load(f).get('model', {}).get('scan_layers', False))
  except (OSError, ValueError):
    return  # unreadable: the trainer's own restore reports what is wrong
  now = bool(cfg.model.scan_layers)
  require(was == now, 'model.scan_layers',
          f'the checkpoints in {workdir} were saved with model.scan_layers={str(was).lower()}, '
          f'this run has {str(now).lower()}; resume with '
          f'--config.model.scan_layers={str(was).lower()} (the checkpoints are untouched)')


def validate_mesh(cfg, num_devices: int) -> None:
  """The mesh against the devices there are (known once the processes have joined)."""
  from routed.sharding import RULES, mesh_shape  # pylint: disable=g-import-not-at-top
  sizes = mesh_shape(cfg.mesh, num_devices)
  shards = 1
  for axis in RULES['batch']:
    shards *= sizes[axis]
  eval_size = cfg.eval.batch_size or cfg.train.batch_size
  n = max(1, cfg.moe.group_size // cfg.train.seq_len)  # sequences per routing group
  k = cfg.train.microbatches
  for key, size in (('train.batch_size', cfg.train.batch_size // k),
                    ('eval.batch_size', eval_size)):
    per = ' of each of the train.microbatches' if k > 1 and key == 'train.batch_size' else ''
    require(size % shards == 0, key, f'{size} sequences{per} do not split over the {shards} '
            f'batch shards of the mesh (mesh.data x mesh.fsdp x mesh.expert)')
    require(size // shards % n == 0, 'moe.group_size',
            f'the {size // shards} sequences of {key}={size} on each batch shard do not form '
            f'routing groups of {n} sequences')
  expert = sizes['expert']
  experts = cfg.moe.num_experts * cfg.moe.granularity
  fine = (f' (moe.granularity={cfg.moe.granularity} x moe.num_experts)'
          if experts != cfg.moe.num_experts else '')
  require(cfg.moe.every == 0 or experts % expert == 0, 'moe.num_experts',
          f'{experts} experts{fine} do not split over mesh.expert={expert} devices')


def validate_structure(cfg) -> None:
  """Every group and key of routed/config.py is there (a config file builds on
  base_config()); the first missing one is named."""
  from routed.config import base_config  # pylint: disable=g-import-not-at-top
  from routed.config_change import flatten  # pylint: disable=g-import-not-at-top
  have = set(flatten(json.loads(cfg.to_json())))
  for key in flatten(json.loads(base_config().to_json())):
    if key not in have:
      group = key.split('.')[0]
      what = f'group {group}' if not any(k.startswith(group + '.') for k in have) else f'key {key}'
      raise UsageError(f'config {what} is missing (a config file starts from '
                       'routed.config.base_config() and changes its values)')


def validate_finite(cfg) -> None:
  """No config number is inf or nan: none of them means 'unlimited' (a capacity factor
  of E, say, already drops nothing), and one that reached the model would fail deep in
  it (an OverflowError computing a capacity, a NaN loss)."""
  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, 'items'):
        walk(value, f'{prefix}{key}.')
      elif isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f'config key {prefix}{key}: must be a finite number, got {value}')
  walk(cfg, '')


def validate(cfg, workdir: str | None = None) -> None:
  """Raises UsageError for the first problem found in cfg (and the workdir)."""
  # Imported here: routed.data pulls in the data stack only when it must.
  from routed.data import DataError, check_data_config  # pylint: disable=g-import-not-at-top
  validate_structure(cfg)
  validate_finite(cfg)
  validate_model(cfg)
  validate_training(cfg)
  validate_init(cfg)
  try:
    check_data_config(cfg.data)
  except DataError as e:
    raise UsageError(str(e)) from None
  if workdir is not None:
    validate_workdir(workdir)
    validate_resume_layout(cfg, workdir)
