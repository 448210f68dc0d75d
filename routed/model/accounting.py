"""Analytic parameter and FLOP counts of a config, the basis of MFU and scaling laws.

Model FLOPs follow the PaLM convention: a training step costs 6 FLOPs per active
matmul parameter per token (forward 2, backward 4) plus 12 * layers * D * L per
token for attention scores and values (grouped-query attention shares keys and values,
not the scores: the same 12 * D * L). A gated MLP (swiglu) has three matrices per
hidden unit, the others two; fine-grained experts (moe.granularity) are counted as the
m * E experts of width F / m they are. "Active" counts what one token uses: the
router, the shared experts and the expert MLPs it is run through on average (each
router declares that, `RouterBase.cost`: top_k for token choice, E * C / S for
expert choice, E * P / S for Soft MoE), not all E. Capacity padding, dropped tokens
and recomputation are not model FLOPs, so MFU stays comparable across backends.
A Mixture-of-Depths block (routed/model/mod.py) costs its share of tokens: capacity
times its matmuls, capacity squared times its attention, plus its router for every
token; "active" parameters still count the whole block (a token may use it).
"""

from __future__ import annotations

import dataclasses

from routed.model.layers import GATED
from routed.model.mod import buffer_size, mod_blocks
from routed.model.moe import ROUTERS, fine_grained, group_sequences
from routed.model.transformer import moe_blocks


@dataclasses.dataclass(frozen=True)
class ModelSize:
  total_params: int         # every parameter, all experts included
  active_params: int        # parameters one token uses (embedding lookup included)
  active_matmul_params: int  # active parameters that take part in a matmul
  train_flops_per_token: float
  forward_flops_per_token: float

  @property
  def dense_params(self) -> int:
    """Non-embedding parameters a token sees: N in Clark et al. 2022."""
    return self.active_params - self.embedding_params

  embedding_params: int = 0


def model_size(cfg, vocab_size: int) -> ModelSize:
  m = cfg.model
  moe = fine_grained(cfg.moe, m.d_ff)  # the experts the MoE layers really have
  d, f, L = m.d_model, m.d_ff, cfg.train.seq_len
  # Queries and output [D, D]; keys and values [D, Hkv * Dh] each (grouped-query).
  kv_width = (m.num_kv_heads or m.num_heads) * (d // m.num_heads)
  attn = 2 * d * d + 2 * d * kv_width
  mlp = (3 if m.activation in GATED else 2) * d   # matmul parameters per hidden unit
  norms = 2 * d
  total = active = 0
  matmul = 0.0
  flop_matmul = 0.0  # matmul params weighted by the share of tokens that use them (MoD)
  attention = 0.0    # forward attention FLOPs per token: scores + values
  for is_moe, is_mod in zip(moe_blocks(cfg), mod_blocks(cfg)):
    if is_moe:
      cost = ROUTERS[moe.router].cost(moe, d, L * group_sequences(cfg))
      expert = mlp * moe.expert_d_ff
      shared = moe.num_shared_experts * expert
      fixed = attn + norms + cost.params + shared
      total += fixed + moe.num_experts * expert
      active += fixed + round(min(cost.expert_rows, moe.num_experts) * expert)
      block = attn + cost.matmul_params + shared + cost.expert_rows * expert
    else:
      total += attn + norms + mlp * f
      active += attn + norms + mlp * f
      block = attn + mlp * f
    matmul += block
    # Mixture-of-Depths: a share c of the tokens runs the block, attending among
    # c * L tokens; every token pays the router (and the causal-rule predictor).
    c = buffer_size(cfg.mod.capacity, L) / L if is_mod else 1.0
    p = cfg.mod.predictor_d_ff if is_mod and cfg.mod.causal_rule == 'predictor' else 0
    extra = (d + d * p + p) if is_mod else 0   # router, predictor matrices
    total += extra + (p + 1 if p else 0)       # predictor biases
    active += extra + (p + 1 if p else 0)
    matmul += extra
    flop_matmul += c * block + extra
    attention += 2 * d * (c * L) * c
  embed = vocab_size * d
  unembed = 0 if m.tie_embeddings else vocab_size * d
  total += embed + unembed + d
  active += embed + unembed + d
  matmul += vocab_size * d  # the logits projection, tied or not
  flop_matmul += vocab_size * d
  return ModelSize(total_params=total, active_params=active, active_matmul_params=round(matmul),
                   train_flops_per_token=6.0 * flop_matmul + 6.0 * attention,
                   forward_flops_per_token=2.0 * flop_matmul + 2.0 * attention,
                   embedding_params=embed + unembed)
