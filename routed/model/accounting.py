"""Analytic parameter and FLOP counts of a config, the basis of MFU and scaling laws.

Model FLOPs follow the PaLM convention: a training step costs 6 FLOPs per active
matmul parameter per token (forward 2, backward 4) plus 12 * layers * D * L per
token for attention scores and values. "Active" counts what one token uses: the
router and top_k experts of an MoE layer, not all E. Capacity padding, dropped tokens
and recomputation are not model FLOPs, so MFU stays comparable across backends.
"""

from __future__ import annotations

import dataclasses

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
  m, moe = cfg.model, cfg.moe
  d, f, L = m.d_model, m.d_ff, cfg.train.seq_len
  attn = 4 * d * d
  norms = 2 * d
  total = active = matmul = 0
  for is_moe in moe_blocks(cfg):
    if is_moe:
      e, k = moe.num_experts, min(moe.top_k, moe.num_experts)
      total += attn + norms + d * e + e * 2 * d * f
      active += attn + norms + d * e + k * 2 * d * f
      matmul += attn + d * e + k * 2 * d * f
    else:
      total += attn + norms + 2 * d * f
      active += attn + norms + 2 * d * f
      matmul += attn + 2 * d * f
  embed = vocab_size * d
  unembed = 0 if m.tie_embeddings else vocab_size * d
  total += embed + unembed + d
  active += embed + unembed + d
  matmul += vocab_size * d  # the logits projection, tied or not
  attention = 2 * m.num_layers * d * L  # forward: scores + values, per token
  return ModelSize(total_params=total, active_params=active, active_matmul_params=matmul,
                   train_flops_per_token=6.0 * matmul + 6.0 * attention,
                   forward_flops_per_token=2.0 * matmul + 2.0 * attention,
                   embedding_params=embed + unembed)
