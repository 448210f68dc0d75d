"""Mixtral 8x7B's architecture (Jiang et al. 2024): top-2 of 8 SwiGLU experts in every
block, grouped-query attention, RMSNorm, rotary positions.

  python -m routed.train --config=configs/mixtral_like.py --workdir=...       # accelerators
  python -m routed.train --config=configs/mixtral_like.py:tiny --workdir=...  # this laptop

d_model 4096, 32 layers of 32 query heads sharing 8 key/value heads (head width 128),
SwiGLU experts of width 14336, rotary base 1e6, untied embeddings, vocabulary 32000 (the
data's tokenizer sets it). The router is a softmax over the 8 experts whose top 2 are
renormalised, which equals Mixtral's softmax over the top-2 logits; no router noise or
z-loss, the balance loss at Mixtral's 0.02 (Hugging Face's router_aux_loss_coef), and
dropless dispatch as Mixtral's own kernels. This exact architecture is what export to
Hugging Face's MixtralForCausalLM maps parameter by parameter (python -m routed.export),
RMSNorm's epsilon (1e-5) included. The sliding window is off, as in Mixtral v0.1's
released config. Variants: '' (C4), 'tiny' (the CPU quickstart shape, 4 heads
over 2 kv heads).
"""

import switch_base  # configs import their siblings (see routed/cli.py)
from routed.config import base_config


def architecture(c):
  """Mixtral's choices, on whatever width and depth c has."""
  c.model.update(activation='swiglu', tie_embeddings=False, rope_base=1e6, norm_eps=1e-5)
  c.moe.update(router='topk', num_experts=8, top_k=2, every=1, gate='softmax',
               renormalize=True, aux_loss_weight=0.02, z_loss_weight=0.0, jitter=0.0,
               dispatch='ragged')


def get_config(variant: str = ''):
  c = base_config()
  c.model.update(d_model=4096, num_heads=32, num_kv_heads=8, num_layers=32, d_ff=14336,
                 compute_dtype='bfloat16', param_dtype='float32')
  architecture(c)
  c.train.update(steps=100_000, batch_size=256, seq_len=4096, learning_rate=3e-4,
                 warmup_steps=2000)
  c.data.update(task='c4')
  if variant == 'tiny':
    switch_base.tiny(c)
    c.model.update(num_kv_heads=2)
    architecture(c)
  elif variant:
    raise ValueError(f'unknown variant {variant!r} (choose from: tiny)')
  return c
