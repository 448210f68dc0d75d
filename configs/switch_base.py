"""Switch-Base (Fedus et al. 2022) as a decoder LM: 128 experts in every other block.

  python -m routed.train --config=configs/switch_base.py --workdir=...       # C4, accelerators
  python -m routed.train --config=configs/switch_base.py:tiny --workdir=...  # this laptop

Variants: '' (Switch-Base shape on C4), 'tiny' (a few minutes on a 2-core CPU with the
embedded corpus).
"""

from routed.config import base_config


def get_config(variant: str = ''):
  c = base_config()
  # Switch-Base: d_model 768, 12 heads x 64, 12 layers, d_ff 3072 with ReLU (as in the
  # released checkpoints), 128 experts in every other FFN.
  c.model.update(d_model=768, num_heads=12, num_layers=12, d_ff=3072, activation='relu',
                 compute_dtype='bfloat16')
  c.moe.update(router='switch', num_experts=128, every=2, top_k=1, capacity_factor=1.25,
               eval_capacity_factor=2.0, aux_loss_weight=0.01)
  c.train.update(steps=100_000, batch_size=256, seq_len=512, learning_rate=1e-3,
                 warmup_steps=10_000)
  c.data.task = 'c4'
  if variant == 'tiny':
    tiny(c)
  elif variant:
    raise ValueError(f'unknown variant {variant!r} (choose from: tiny)')
  return c


def tiny(c):
  """The CPU quickstart shape, shared by the other configs' ':tiny' variants."""
  c.model.update(d_model=128, num_heads=4, num_layers=4, d_ff=512, activation='gelu',
                 compute_dtype='float32')
  c.moe.num_experts = 8
  c.train.update(steps=600, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=60,
                 log_every=50)
  c.eval.update(every_steps=200, num_batches=8)
  c.checkpoint.update(every_steps=200, keep=2)
  c.data.update(task='stdlib', vocab_size=4096)
