"""Mixture-of-Depths (Raposo et al. 2024) on the dense baseline: every other block
routes the top 12.5% of each sequence's tokens; the rest skip it on the residual.

  python -m routed.train --config=configs/mod_base.py:tiny --workdir=runs/mod
  python -m routed.sample --workdir=runs/mod --prompt='def '

Training is not causal (top-k over the sequence); evaluation and sampling use the
causal rule (mod.causal_rule, here the router's own logit trained by the auxiliary
binary loss). Variants: '' (C4), 'tiny' (CPU).
"""

import dense_base  # configs import their siblings (see routed/cli.py)


def get_config(variant: str = ''):
  c = dense_base.get_config(variant)
  c.mod.update(enabled=True, every=2, capacity=0.125, causal_rule='aux_loss')
  return c
