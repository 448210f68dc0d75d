"""routed's parameters as Hugging Face `transformers` checkpoints, and back.

Two architectures of `transformers` compute what a routed model computes:
  llama    a dense routed model (moe.every = 0) with SwiGLU MLPs: LlamaForCausalLM
  mixtral  top-k of E SwiGLU experts in every block (moe.every = 1), softmax over the
           experts renormalised over the chosen k, no shared or null experts:
           MixtralForCausalLM (configs/mixtral_like.py)
Both share the rest: RMSNorm before attention and before the MLP, rotary positions in
the rotate-half form with base model.rope_base, grouped-query attention with query
head h reading key/value head h // (H / Hkv), no biases, untied or tied embeddings.
Everything else (expert choice, Soft MoE, S-BASE, hash, RL-R, Switch's unnormalised
weights, Mixture-of-Depths, null or shared experts, the aux-loss-free selection bias,
μP's multipliers, non-gated activations) has no counterpart there and is refused by
`unsupported` with the reason; the Orbax checkpoint stays those models' format.

Tensor layout (routed, unscanned names -> Hugging Face; D d_model, H heads, Hkv key/
value heads, Dh head width, F hidden width, E experts, V vocabulary). Linear weights
in `transformers` are [out, in]; routed's kernels are [in, out]:
  embed [V, D]                        model.embed_tokens.weight
  blocks/i/attn_norm/scale [D]        model.layers.i.input_layernorm.weight
  blocks/i/attn/qkv [D, 3, H, Dh]     ...self_attn.{q,k,v}_proj.weight [H Dh, D]
    (GQA: attn/q [D, H, Dh], attn/kv [D, 2, Hkv, Dh])
  blocks/i/attn/out [H, Dh, D]        ...self_attn.o_proj.weight [D, H Dh]
  blocks/i/ffn_norm/scale [D]         model.layers.i.post_attention_layernorm.weight
  blocks/i/ffn/wi [D, 2F]             ...mlp.gate_proj.weight [F, D] (even columns),
                                      ...mlp.up_proj.weight [F, D] (odd columns)
  blocks/i/ffn/wo [F, D]              ...mlp.down_proj.weight [D, F]
  blocks/i/ffn/router/kernel [D, E]   ...block_sparse_moe.gate.weight [E, D]
  blocks/i/ffn/experts/wi [E, D, 2F]  ...block_sparse_moe.experts.e.w1 (gate), w3 (up) [F, D]
  blocks/i/ffn/experts/wo [E, F, D]   ...block_sparse_moe.experts.e.w2.weight [D, F]
  final_norm/scale [D]                model.norm.weight
  unembed [D, V]                      lm_head.weight [V, D] (absent when tied)
Mixtral's names are those of its published checkpoints, which every `transformers`
release reads (5.x fuses the experts on load).
"""

from __future__ import annotations

import re

import numpy as np

from routed.model.layers import GATED

LAYER = 'model.layers.{i}.'


def unsupported(cfg) -> str | None:
  """Why `transformers` cannot express this model (None: it can); names the config key."""
  m, moe = cfg.model, cfg.moe
  checks = [(not (cfg.mod.enabled and cfg.mod.every),
             'mod.enabled: transformers has no Mixture-of-Depths model'),
            (m.parametrization == 'standard' or m.d_model == m.mup_base_width,
             'model.parametrization=mup: transformers has no muP output and attention '
             'multipliers')]
  if moe.every:
    checks += [
        (moe.router == 'topk', f"moe.router={moe.router}: transformers' Mixtral routes by "
         'top-k token choice with renormalised softmax weights (moe.router=topk) only'),
        (moe.every == 1, f'moe.every={moe.every}: Mixtral has an MoE layer in every block'),
        (moe.gate == 'softmax', f"moe.gate={moe.gate}: Mixtral's gate is a softmax"),
        (moe.renormalize, 'moe.renormalize=false: Mixtral renormalises the top-k weights'),
        (moe.top_p == 0, 'moe.top_p: Mixtral chooses a fixed top-k'),
        (moe.num_null_experts == 0, 'moe.num_null_experts: Mixtral has no null experts'),
        (moe.num_shared_experts == 0, 'moe.num_shared_experts: Mixtral has no shared experts'),
        (moe.bias_update_rate == 0, 'moe.bias_update_rate: Mixtral has no selection bias')]
  checks.append((m.activation in GATED, f'model.activation={m.activation}: Llama and Mixtral '
                 'have gated SwiGLU MLPs only (model.activation=swiglu)'))
  return next((reason for ok, reason in checks if not ok), None)


def architecture(cfg) -> str:
  return 'llama' if cfg.moe.every == 0 else 'mixtral'


def hf_config(cfg, vocab_size: int) -> dict:
  """config.json of the Hugging Face model (cfg must pass `unsupported`)."""
  from routed.model.moe import fine_grained  # pylint: disable=g-import-not-at-top
  m = cfg.model
  arch = architecture(cfg)
  out = {
      'architectures': ['LlamaForCausalLM' if arch == 'llama' else 'MixtralForCausalLM'],
      'model_type': arch, 'vocab_size': vocab_size, 'hidden_size': m.d_model,
      'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
      'num_key_value_heads': m.num_kv_heads or m.num_heads,
      'head_dim': m.d_model // m.num_heads, 'hidden_act': 'silu',
      'intermediate_size': m.d_ff, 'rms_norm_eps': m.norm_eps, 'rope_theta': m.rope_base,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': m.rope_base},
      'max_position_embeddings': cfg.train.seq_len, 'tie_word_embeddings': m.tie_embeddings,
      'attention_bias': False, 'mlp_bias': False, 'torch_dtype': m.param_dtype,
      'bos_token_id': None, 'eos_token_id': 1, 'pad_token_id': 0,
  }
  if arch == 'mixtral':
    moe = fine_grained(cfg.moe, m.d_ff)   # fine-grained experts are just more, narrower ones
    out.update(num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
               intermediate_size=moe.expert_d_ff, router_aux_loss_coef=cfg.moe.aux_loss_weight,
               router_jitter_noise=0.0, sliding_window=None, output_router_logits=False)
  return out


def _linear(kernel):
  """routed [in, ...out] -> transformers [out, in]."""
  return np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)


def to_hf(params: dict) -> dict:
  """Flat unscanned routed params ({'blocks/0/attn/qkv': array, ...}) -> {HF name: array}."""
  out = {'model.embed_tokens.weight': params['embed'],
         'model.norm.weight': params['final_norm/scale']}
  if 'unembed' in params:
    out['lm_head.weight'] = _linear(params['unembed'])
  for name, value in params.items():
    match = re.fullmatch(r'blocks/(\d+)/(.+)', name)
    if not match:
      continue
    pre, rest = LAYER.format(i=match[1]), match[2]
    attn = pre + 'self_attn.'
    if rest == 'attn_norm/scale':
      out[pre + 'input_layernorm.weight'] = value
    elif rest == 'ffn_norm/scale':
      out[pre + 'post_attention_layernorm.weight'] = value
    elif rest == 'attn/qkv':
      for t, proj in enumerate('qkv'):
        out[attn + f'{proj}_proj.weight'] = _linear(value[:, t])
    elif rest == 'attn/q':
      out[attn + 'q_proj.weight'] = _linear(value)
    elif rest == 'attn/kv':
      out[attn + 'k_proj.weight'], out[attn + 'v_proj.weight'] = (_linear(value[:, t])
                                                                  for t in (0, 1))
    elif rest == 'attn/out':
      out[attn + 'o_proj.weight'] = np.ascontiguousarray(value.reshape(-1, value.shape[-1]).T)
    elif rest == 'ffn/wi':
      out[pre + 'mlp.gate_proj.weight'] = _linear(value[:, 0::2])
      out[pre + 'mlp.up_proj.weight'] = _linear(value[:, 1::2])
    elif rest == 'ffn/wo':
      out[pre + 'mlp.down_proj.weight'] = _linear(value)
    elif rest == 'ffn/router/kernel':
      out[pre + 'block_sparse_moe.gate.weight'] = _linear(value)
    elif rest == 'ffn/experts/wi':
      for e in range(value.shape[0]):
        out[pre + f'block_sparse_moe.experts.{e}.w1.weight'] = _linear(value[e][:, 0::2])
        out[pre + f'block_sparse_moe.experts.{e}.w3.weight'] = _linear(value[e][:, 1::2])
    elif rest == 'ffn/experts/wo':
      for e in range(value.shape[0]):
        out[pre + f'block_sparse_moe.experts.{e}.w2.weight'] = _linear(value[e])
    else:
      raise ValueError(f'parameter {name} has no Hugging Face counterpart')
  return out


def model_overrides(hf: dict) -> dict:
  """A Llama config.json -> routed config values {'model.d_model': ..., 'moe.every': 0}.
  Raises ValueError naming the field that routed cannot reproduce."""
  if hf.get('model_type') != 'llama':
    raise ValueError(f"model_type {hf.get('model_type')!r}: only Llama-style dense models "
                     "('llama') are imported")
  heads, width = hf['num_attention_heads'], hf['hidden_size']
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  checks = [(hf.get('hidden_act', 'silu') == 'silu', f"hidden_act {hf.get('hidden_act')!r}: "
             "routed's gated MLP is SwiGLU (silu)"),
            (not hf.get('attention_bias') and not hf.get('mlp_bias'),
             'attention_bias / mlp_bias: routed has no biases'),
            ((hf.get('head_dim') or width // heads) * heads == width,
             f"head_dim {hf.get('head_dim')}: routed needs hidden_size / num_attention_heads"),
            (rope.get('rope_type', 'default') == 'default',
             f"rope type {rope.get('rope_type')!r}: routed has the default rotary positions only")]
  for ok, reason in checks:
    if not ok:
      raise ValueError(reason)
  kv = hf.get('num_key_value_heads') or heads
  return {'model.d_model': width, 'model.num_heads': heads, 'model.num_layers':
          hf['num_hidden_layers'], 'model.d_ff': hf['intermediate_size'],
          'model.num_kv_heads': 0 if kv == heads else kv, 'model.activation': 'swiglu',
          'model.norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
          'model.rope_base': float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
          'model.tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
          'model.parametrization': 'standard', 'moe.every': 0, 'mod.enabled': False}


def _kernel(weight, *out_shape):
  """transformers [out, in] -> routed [in, *out_shape]."""
  return np.ascontiguousarray(weight.T).reshape(weight.shape[1], *out_shape)


def from_hf(tensors: dict, cfg) -> dict:
  """{HF name: array} of a Llama model -> flat unscanned routed params for cfg (made
  with model_overrides). Raises ValueError naming a missing or misshapen tensor."""
  m = cfg.model
  h, kvh, dh = m.num_heads, m.num_kv_heads or m.num_heads, m.d_model // m.num_heads
  used = set()
  def get(name, shape):
    if name not in tensors:
      raise ValueError(f'tensor {name} is missing')
    value = np.asarray(tensors[name])
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f'tensor {name} has shape {tuple(value.shape)}, the config needs '
                       f'{tuple(shape)}')
    used.add(name)
    return value
  if 'model.embed_tokens.weight' not in tensors:
    raise ValueError('tensor model.embed_tokens.weight is missing')
  vocab = np.asarray(tensors['model.embed_tokens.weight']).shape[0]
  d, f = m.d_model, m.d_ff
  out = {'embed': get('model.embed_tokens.weight', (vocab, d)),
         'final_norm/scale': get('model.norm.weight', (d,))}
  if not m.tie_embeddings:
    out['unembed'] = get('lm_head.weight', (vocab, d)).T.copy()
  for i in range(m.num_layers):
    pre, b = LAYER.format(i=i), f'blocks/{i}/'
    attn = pre + 'self_attn.'
    q = _kernel(get(attn + 'q_proj.weight', (h * dh, d)), h, dh)
    k, v = (_kernel(get(attn + f'{p}_proj.weight', (kvh * dh, d)), kvh, dh) for p in 'kv')
    if kvh == h:
      out[b + 'attn/qkv'] = np.stack([q, k, v], axis=1)
    else:
      out[b + 'attn/q'], out[b + 'attn/kv'] = q, np.stack([k, v], axis=1)
    out[b + 'attn/out'] = get(attn + 'o_proj.weight', (d, h * dh)).T.reshape(h, dh, d).copy()
    out[b + 'attn_norm/scale'] = get(pre + 'input_layernorm.weight', (d,))
    out[b + 'ffn_norm/scale'] = get(pre + 'post_attention_layernorm.weight', (d,))
    wi = np.empty((d, 2 * f), np.asarray(tensors['model.embed_tokens.weight']).dtype)
    wi[:, 0::2] = get(pre + 'mlp.gate_proj.weight', (f, d)).T
    wi[:, 1::2] = get(pre + 'mlp.up_proj.weight', (f, d)).T
    out[b + 'ffn/wi'] = wi
    out[b + 'ffn/wo'] = get(pre + 'mlp.down_proj.weight', (d, f)).T.copy()
  # Tied checkpoints may still carry lm_head (a copy of the embedding).
  extra = sorted(n for n in set(tensors) - used - {'lm_head.weight'}
                 if not n.endswith('rotary_emb.inv_freq'))   # a buffer older releases saved
  if extra:
    raise ValueError(f'tensor {extra[0]} has no place in a {m.num_layers}-layer routed model')
  return out
