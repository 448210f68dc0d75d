"""What a resumed run may change: the command's config against WORKDIR/config.json.

A run that resumes from its checkpoints must be the run that wrote them. Before
anything in WORKDIR is read or moved, routed.train compares the command's resolved
config with the one the run recorded; a difference in any key outside RESUMABLE
(anything that shapes the model, the optimizer state, the routing or the data
stream: widths, expert counts, seeds, learning rates, capacity factors...) is one
line listing the keys, exit 2, nothing touched. `--allow_config_change=KEY,...`
accepts the named keys anyway; each accepted change is recorded in config.json under
'config_changes' ({"step": the step it took effect, "changes": {key: [old, new]}}),
so the record of what the run was is never lost.
"""

from __future__ import annotations

import json

from routed.cli import UsageError

# Keys a resumed run may change without asking, and why each is safe.
RESUMABLE = {
    'train.steps': 'extends or shortens the run',
    'train.log_every': 'reporting only',
    'train.peak_flops': 'reporting only (MFU)',
    'train.nonfinite': 'what happens at a non-finite step, not what a finite one computes',
    'eval.every_steps': 'evaluation only', 'eval.num_batches': 'evaluation only',
    'eval.batch_size': 'evaluation only',
    'checkpoint.every_steps': 'when to save', 'checkpoint.keep': 'how many to keep',
    'checkpoint.async_save': 'how to save',
    'mesh.data': 'the state is restored onto any mesh', 'mesh.fsdp': 'likewise',
    'mesh.expert': 'likewise', 'mesh.tensor': 'likewise',
    'model.remat': 'the same function, recomputed differently',
    'model.attention': 'the same function, another kernel (tested against the reference)',
    'data.data_dir': "where the embedded corpus's cache lives, not what it holds",
    'init.from_checkpoint': 'read only when a run starts', 'init.upcycle': 'likewise',
    'init.upcycle_noise': 'likewise', 'init.data_offset': 'likewise (the checkpoint '
                                                           'records the data position)',
}
RECORD = 'config_changes'   # config.json's record of accepted changes


def flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def recorded(text: str):
  """(the config a run recorded, as base_config with it applied; its change record)."""
  from routed.config import base_config  # pylint: disable=g-import-not-at-top
  saved = json.loads(text)
  history = saved.pop(RECORD, [])
  cfg = base_config()
  cfg.update(saved)   # keys added since the run started take their defaults
  return cfg, history


def check(cfg, saved_text: str, step: int, allowed: str = '') -> str:
  """config.json's new text for a run resuming at `step` with cfg, or UsageError naming
  the keys that differ from the recorded config and may not change."""
  try:
    old, history = recorded(saved_text)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise UsageError(f'WORKDIR/config.json does not read as a config ({e}); it must '
                     'describe the checkpoints beside it') from None
  before = flatten(json.loads(old.to_json()))
  now = flatten(json.loads(cfg.to_json()))
  changed = {k: (before.get(k), now[k]) for k in now if before.get(k) != now[k]}
  allowed_keys = {k.strip() for k in allowed.split(',') if k.strip()}
  unknown = sorted(allowed_keys - set(now))
  if unknown:
    raise UsageError(f'--allow_config_change: {unknown[0]} is not a config key')
  refused = {k: v for k, v in changed.items() if k not in RESUMABLE and k not in allowed_keys}
  if refused:
    listed = ', '.join(f'{k} ({a!r} -> {b!r})' for k, (a, b) in sorted(refused.items()))
    raise UsageError(f'the run in WORKDIR was trained with other settings: {listed}; a '
                     'resumed run keeps them (use a new --workdir, or --allow_config_change='
                     f'{",".join(sorted(refused))} to change them from step {step})')
  accepted = {k: list(v) for k, v in changed.items() if k in allowed_keys}
  if accepted:
    history = history + [{'step': step, 'changes': accepted}]
  out = json.loads(cfg.to_json())
  if history:
    out[RECORD] = history
  return json.dumps(out, indent=2)
