"""DeepSeekMoE's recipe (Dai et al. 2024; DeepSeek-V3's balancing): fine-grained and
shared experts, sigmoid gates with aux-loss-free balancing, SwiGLU.

  python -m routed.train --config=configs/deepseek_moe.py --workdir=...       # C4, accelerators
  python -m routed.train --config=configs/deepseek_moe.py:tiny --workdir=...  # this laptop

The DeepSeekMoE 2B shape: d_model 1280, 9 layers of 10 heads, an MoE layer in every
block. Its experts are fine-grained: 16 experts of SwiGLU width 3456 split 4 ways
(moe.granularity) into 64 of width 864, a token choosing 2 x 4 = 8 of them, plus one
always-on shared expert of width 864 (DeepSeekMoE 2B: 63 routed, top-7, 1 shared);
about 2.04B parameters in all, 0.37B active.
Routing follows DeepSeek-V3: normalised sigmoid scores, the top 8 renormalised,
balanced by a per-expert selection bias moved 0.001 per step (moe.bias_update_rate)
with only a tiny balance loss left. Variants: '' (C4), 'tiny' (the CPU quickstart
shape: 8 experts split 4 ways into 32 of width 128, top-4 of them, one shared).
"""

import switch_base  # configs import their siblings (see routed/cli.py)
from routed.config import base_config


def recipe(c):
  """The DeepSeek routing recipe, on whatever shape c has."""
  c.model.activation = 'swiglu'
  c.moe.update(router='topk', every=1, granularity=4, num_shared_experts=1, gate='sigmoid',
               renormalize=True, bias_update_rate=1e-3, aux_loss_weight=1e-4,
               z_loss_weight=0.0, jitter=0.0, capacity_factor=1.25, eval_capacity_factor=2.0)


def get_config(variant: str = ''):
  c = base_config()
  c.model.update(d_model=1280, num_heads=10, num_layers=9, d_ff=3456,
                 compute_dtype='bfloat16', param_dtype='float32')
  c.moe.update(num_experts=16, top_k=2, dispatch='gather')
  recipe(c)
  c.train.update(steps=100_000, batch_size=256, seq_len=2048, learning_rate=4.2e-4,
                 warmup_steps=2000)
  c.data.task = 'c4'
  if variant == 'tiny':
    switch_base.tiny(c)
    c.moe.update(num_experts=8, top_k=1)
    recipe(c)
  elif variant:
    raise ValueError(f'unknown variant {variant!r} (choose from: tiny)')
  return c
