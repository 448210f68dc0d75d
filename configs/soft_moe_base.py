"""Soft MoE (Puigcerver et al. 2023) in the Switch-Base shape. NOT causal: every slot
averages all tokens of the sequence, so as a decoder LM it sees the future and its
loss is not comparable with causal routers (see README).

slots_per_expert = seq_len / num_experts: E * P slot applications per sequence of S
tokens, one expert application per token, the active FLOPs of switch_base.py.
Variants: '' (C4), 'tiny' (CPU).
"""

import switch_base  # configs import their siblings (see routed/cli.py)


def get_config(variant: str = ''):
  c = switch_base.get_config(variant)
  c.moe.update(router='soft', slots_per_expert=c.train.seq_len // c.moe.num_experts,
               aux_loss_weight=0.0, z_loss_weight=0.0)  # soft MoE has no router losses
  return c
