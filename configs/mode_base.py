"""MoDE: Mixture-of-Depths combined with mixture-of-experts (Raposo et al. 2024, sec. 3.5).

  staged      (variants '' and 'tiny'): the Switch config with MoD on the same
              blocks, so every other block routes 12.5% of the tokens through
              attention and a Switch MoE layer; the rest skip the whole block.
  integrated  (variants 'integrated' and 'integrated_tiny'): no MoD wrapper; the
              MoE router may choose a no-op expert (moe.num_null_experts, zero
              output and zero compute) instead of a real one, so tokens skip the FFN.

  python -m routed.train --config=configs/mode_base.py:tiny --workdir=runs/mode
"""

import switch_base  # configs import their siblings (see routed/cli.py)


def get_config(variant: str = ''):
  if variant in ('integrated', 'integrated_tiny'):
    c = switch_base.get_config('tiny' if variant == 'integrated_tiny' else '')
    # One no-op expert per real one: a token may skip the FFN instead of using an expert.
    c.moe.update(router='topk', top_k=1, num_null_experts=c.moe.num_experts)
    return c
  if variant not in ('', 'tiny'):
    raise ValueError(f'unknown variant {variant!r} (choose from: tiny, integrated, '
                     'integrated_tiny)')
  c = switch_base.get_config(variant)
  c.mod.update(enabled=True, every=c.moe.every, capacity=0.125, causal_rule='aux_loss')
  return c
