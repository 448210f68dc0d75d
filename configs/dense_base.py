"""The dense baseline of configs/switch_base.py: same shape and active FLOPs per token.

Every block has the dense MLP of width d_ff, which is what a token sees in a top-1
Switch layer (less the router's D x E matmul). Variants: '' (C4), 'tiny' (CPU).
"""

import switch_base  # configs import their siblings (see routed/cli.py)


def get_config(variant: str = ''):
  c = switch_base.get_config(variant)
  c.moe.every = 0  # no MoE blocks
  return c
