"""`routed.train --config=configs/switch_base.py:tiny --config.moe.router=NAME` trains for
every router, and the router configs load; runs are a few steps at a tiny size."""

import json
import os

import numpy as np
import pytest

from routed import cli
from routed.model.moe import ROUTERS
from routed.train import main as train_main
from test_train import ROOT, tiny_args  # tests/ is on sys.path under pytest

# A few steps with one evaluation at the end: compile time is the cost.
FEW_STEPS = {'train.steps': 3, 'train.warmup_steps': 1, 'train.log_every': 3,
             'eval.every_steps': 3, 'eval.num_batches': 1, 'checkpoint.every_steps': 3}
# topk needs k > 1 to differ from switch; soft S / E slots per expert (64 / 4).
EXTRA = {'topk': {'moe.top_k': 2, 'moe.renormalize': True}, 'soft': {'moe.slots_per_expert': 16}}


@pytest.mark.parametrize('router', sorted(ROUTERS))
def test_every_router_trains(router, mini_data_cfg, tmp_path, capsys):
  workdir = str(tmp_path / router)
  overrides = dict(FEW_STEPS, **{'moe.router': router}, **EXTRA.get(router, {}))
  assert train_main(tiny_args(mini_data_cfg, workdir, **overrides)) == 0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = [json.loads(line) for line in f][-1]
  assert last['step'] == 3 and np.isfinite(last['train/loss']) and np.isfinite(last['eval/ce'])
  assert len(last['train/moe/layer1/expert_load']) == 4
  if router == 'soft':
    assert 'train/moe/layer1/dispatch_entropy' in last
  if router == 'reinforce':
    assert 'train/reinforce_loss' in last and 'eval/reinforce_loss' not in last
  # The evaluation line states the routing mode it used.
  err = capsys.readouterr().err
  assert f'eval routing {router}:' in err
  assert ('NON-CAUSAL' in err) == (router in ('expert_choice', 'soft'))


@pytest.mark.parametrize('spec,router', [('expert_choice_base.py', 'expert_choice'),
                                         ('soft_moe_base.py', 'soft')])
def test_router_configs_load(spec, router):
  path = os.path.join(ROOT, 'configs', spec)
  base, _ = cli.parse([f'--config={path}'], {'config': None})
  tiny, _ = cli.parse([f'--config={path}:tiny'], {'config': None})
  assert base.moe.router == tiny.moe.router == router
  assert base.model.d_model == 768 and tiny.model.d_model == 128
  if router == 'soft':  # S / E slots per expert: one expert application per token
    for c in (base, tiny):
      assert c.moe.slots_per_expert * c.moe.num_experts == c.train.seq_len
