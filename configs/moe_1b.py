"""A 1B-active MoE LM for a TPU v5p slice: about 1.07B active and 13.5B total parameters.

  python -m routed.aot --config=configs/moe_1b.py --topology=v5p-64     # does it fit?
  python -m routed.train --config=configs/moe_1b.py --workdir=gs://... \
      --config.data.path=/mnt/BUCKET/c4                                  # on the slice
  python -m routed.train --config=configs/moe_1b.py:tiny --workdir=...   # this laptop

d_model 2048, 24 layers of 16 heads, d_ff 4096; 64 experts (each as wide as the dense
MLP), top-2 in every other block; seq_len 2048, global batch 512 x 2048 tokens (1M
tokens per step), bfloat16 compute with float32 master weights. The exact parameter
and FLOP counts are routed.model.accounting.model_size's (tests/test_model.py checks
them against the built model at small width).

The mesh and memory settings are the recommendation for v5p-64 (32 chips) that
benchmarks/RESULTS.md ("A 1B-active MoE on v5p") measured with routed.aot: experts
split 8 ways (8 experts per chip), parameters and optimizer state sharded over fsdp,
each block rematerialised with dots_saveable, the 12 dense + MoE units scanned
(scan_layers), routing groups of 4 sequences (8,192 tokens). Variants: '' (C4 on a v5p slice), 'tiny' (the CPU quickstart shape, top-2
of 8 experts).
"""

import switch_base  # configs import their siblings (see routed/cli.py)
from routed.config import base_config


def get_config(variant: str = ''):
  c = base_config()
  c.model.update(d_model=2048, num_heads=16, num_layers=24, d_ff=4096, activation='gelu',
                 compute_dtype='bfloat16', param_dtype='float32', remat='dots_saveable',
                 scan_layers=True)
  c.moe.update(router='topk', num_experts=64, top_k=2, every=2, capacity_factor=1.25,
               eval_capacity_factor=2.0, aux_loss_weight=0.01, z_loss_weight=1e-3,
               dispatch='gather', group_size=4 * 2048)
  c.train.update(steps=100_000, batch_size=512, seq_len=2048, learning_rate=3e-4,
                 warmup_steps=2000)
  c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
  c.data.task = 'c4'
  if variant == 'tiny':
    switch_base.tiny(c)
    c.model.update(remat='none', scan_layers=False)
    c.moe.update(group_size=0, top_k=2)
    c.mesh.update(data=-1, fsdp=1, expert=1)
  elif variant:
    raise ValueError(f'unknown variant {variant!r} (choose from: tiny)')
  return c
