"""The grid of "Unified Scaling Laws for Routed Language Models" (Clark et al. 2022) as a
sweep: model sizes x expert counts x the paper's three routers, plus the dense models.

  python -m routed.sweep --config=configs/sweeps/unified_scaling.py:cpu --workdir=/tmp/sweep_cpu
  python -m routed.sweep --config=configs/sweeps/unified_scaling.py --workdir=DIR --launch=print
  python -m routed.scaling fit --curves=DIR/curves.csv --router=S-Base

Variants:
  ''     the paper's grid: sizes 15M ... 1.3B, E in {2, 4, ..., 512} for each of S-Base
         (moe.router=sbase), Hash (hash) and RL-R (reinforce), routing every other block
         (moe.every=2), top-1, and a dense model (moe.every=0, E = 1) per size: 168
         points of 250k steps x 256 x 2048 tokens (about 130B tokens, as the paper) on C4
         (the paper used MassiveText). For accelerators: print the commands and launch them.
  'cpu'  a grid that runs on a 2-core CPU in about 35 minutes: three tiny sizes x
         E in {2, 4, 8} x the three routers + a dense model per size (30 points), 200 steps
         of 16 x 128 tokens each (410k tokens) on the embedded corpus (stdlib, with a
         512-piece vocabulary, prepared on first use in about a minute).
  'VARIANT@HYPER_ID'  one point's train config (what routed.sweep runs for it).

Each point is the base config plus a few overrides (model shape, router, experts); see
routed/sweep/spec.py for the format. The curves' model_size_label is the preset name.

Model presets of the paper (d_model, blocks, heads, head size): 15M (512, 6, 8, 32),
25M (512, 8, 8, 64), 55M (640, 10, 12, 64), 130M (896, 12, 16, 64), 370M (1536, 12, 12,
128), 1.3B (2048, 24, 16, 128). Our attention has head size d_model / heads, so where the
paper's heads x head size differs from d_model (15M, 55M, 130M) we keep d_model and
blocks and use d_model / 64 heads of 64 (15M: 8 heads of 64), which makes those models
somewhat larger than their label (dense_parameter_count in the curves has the exact N).
d_ff = 4 d_model. The paper's learning-rate schedule is not reproduced: the base
schedule (AdamW, warmup, cosine) is ours.
"""

from routed.config import base_config
from routed.sweep.spec import make_sweep, point, select_variant

# label: (d_model, num_layers, num_heads) in our model (head size d_model / num_heads).
PAPER_PRESETS = {
    '15M': (512, 6, 8),
    '25M': (512, 8, 8),
    '55M': (640, 10, 10),
    '130M': (896, 12, 14),
    '370M': (1536, 12, 12),
    '1.3B': (2048, 24, 16),
}
PAPER_EXPERTS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
# The paper's three routing techniques (its router_type names in routed/sweep/collect.py).
ROUTERS = ('sbase', 'hash', 'reinforce')

# The CPU grid: (d_model, num_layers, num_heads): 25k, 98k and 221k dense
# (non-embedding) parameters; one MoE layer (block 2 of 2). A 512-piece vocabulary keeps
# the logits from dominating the cost of such small models.
CPU_PRESETS = {
    'cpu-s': (32, 2, 2),
    'cpu-m': (64, 2, 4),
    'cpu-l': (96, 2, 6),
}
CPU_EXPERTS = (2, 4, 8)


def grid_points(presets: dict, experts, routers=ROUTERS) -> list[dict]:
  """A dense point and one point per (router, E) for each preset, routed every other block."""
  points = []
  for label, (d_model, layers, heads) in presets.items():
    shape = {'model.d_model': d_model, 'model.num_layers': layers, 'model.num_heads': heads,
             'model.d_ff': 4 * d_model}
    points.append(point(f'dense-{label}', {**shape, 'moe.every': 0, 'moe.num_experts': 1},
                        model_size_label=label))
    for router in routers:
      for e in experts:
        points.append(point(f'{router}-{label}-e{e}',
                            {**shape, 'moe.every': 2, 'moe.router': router,
                             'moe.num_experts': e},
                            model_size_label=label))
  return points


def full():
  c = base_config()
  c.model.update(activation='gelu', compute_dtype='bfloat16')
  c.moe.update(every=2, top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0)
  c.train.update(steps=250_000, batch_size=256, seq_len=2048, learning_rate=1e-3,
                 warmup_steps=2_500, seed=42)
  c.eval.update(every_steps=10_000, num_batches=16)
  c.checkpoint.update(every_steps=5_000, keep=2)
  c.data.task = 'c4'
  return make_sweep('unified_scaling', c, grid_points(PAPER_PRESETS, PAPER_EXPERTS))


def cpu():
  c = base_config()
  c.model.update(activation='gelu', compute_dtype='float32')
  c.moe.update(every=2, top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0)
  # seed 42: the seed routed.scaling selects by default (the paper's main seed).
  c.train.update(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20,
                 log_every=25, seed=42)
  c.eval.update(every_steps=100, num_batches=8)
  c.checkpoint.update(every_steps=100, keep=1)
  c.data.update(task='stdlib', vocab_size=512)
  return make_sweep('unified_scaling:cpu', c, grid_points(CPU_PRESETS, CPU_EXPERTS))


def get_config(variant: str = ''):
  return select_variant({'': full, 'cpu': cpu}, variant)
