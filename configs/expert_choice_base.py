"""Expert choice routing (Zhou et al. 2022) in the Switch-Base shape: each expert takes
its top-C tokens of the sequence. NOT causal: an expert ranks the whole sequence, so
its numbers as a decoder LM are not comparable with causal routers (see README).

Capacity factor 1 (C = S / E): on average one expert per token, the active FLOPs of
switch_base.py. The paper's headline setting is 2 (`--config.moe.capacity_factor=2
--config.moe.eval_capacity_factor=2`, the FLOPs of top-2). Evaluation uses the same
capacity factor as training: with more, every token would get more experts than it
was trained with. Variants: '' (C4), 'tiny' (CPU).
"""

import switch_base  # configs import their siblings (see routed/cli.py)


def get_config(variant: str = ''):
  c = switch_base.get_config(variant)
  c.moe.update(router='expert_choice', capacity_factor=1.0, eval_capacity_factor=1.0,
               aux_loss_weight=0.0)  # balanced by construction
  return c
