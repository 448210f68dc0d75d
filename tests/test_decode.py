"""Decoding (routed/decode.py, routed/model/kv_cache.py): the key/value cache computes
what recomputing the window computes, for every causal router; sampling's filters."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed import cli, decode
from routed.model import attention, kv_cache
from routed.model.transformer import build_model
from routed.routing_state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
# Rows of different lengths, decoded together.
PROMPTS = [[5, 9, 13], list(range(20, 37)), [7]]


def test_cache_appended_in_pieces_is_the_reference_attention():
  """Keys written 3 + 1 + 2 at a time (and a padded token that is not written) give
  each query the reference attention over the tokens up to it."""
  b, l, h, kvh, dh = 2, 6, 4, 2, 8
  q, k, v = (jax.random.normal(jax.random.key(i), (b, l, n, dh))
             for i, n in enumerate((h, kvh, kvh)))
  want = attention.reference(q, k, v)
  cache = kv_cache.init(b, 8, kvh, dh, jnp.float32)
  outs = []
  for lo, hi in ((0, 3), (3, 4), (4, 6)):
    # A padding token after the real ones: attends to nothing of its own, written nowhere.
    pad = lambda a: jnp.concatenate([a[:, lo:hi], a[:, :1]], axis=1)
    valid = jnp.arange(hi - lo + 1)[None, :] < hi - lo
    cache, slots = kv_cache.append(cache, pad(k), pad(v), jnp.broadcast_to(valid, (b, hi - lo + 1)))
    outs.append(kv_cache.attend(pad(q), cache, slots)[:, :hi - lo])
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(cache['length'], [l, l])
  np.testing.assert_array_equal(cache['k'][:, l:], 0)   # the padding was not written


def test_append_skips_invalid_tokens_in_the_slot_count():
  cache = kv_cache.init(1, 4, 1, 2, jnp.float32)
  k = jnp.arange(8, dtype=jnp.float32).reshape(1, 4, 1, 2)
  cache, slots = kv_cache.append(cache, k, k, jnp.array([[True, False, True, True]]))
  np.testing.assert_array_equal(slots, [[0, 0, 1, 2]])
  np.testing.assert_array_equal(cache['k'][0, :3, 0], [[0, 1], [4, 5], [6, 7]])
  assert int(cache['length'][0]) == 3


def tiny(spec: str, **overrides):
  cfg = cli.load_config(os.path.join(ROOT, 'configs', spec))
  cfg.model.update(d_model=32, num_heads=4, num_layers=4, d_ff=64)
  cfg.moe.num_experts = 4
  cfg.train.seq_len = 32
  for key, value in overrides.items():
    section, name = key.split('__')
    cfg[section][name] = value
  return decode.sampling_config(cfg)


CAUSAL = {
    'switch': ('switch_base.py:tiny', {}),
    'topk': ('switch_base.py:tiny', {'moe__router': 'topk', 'moe__top_k': 2}),
    'hash': ('switch_base.py:tiny', {'moe__router': 'hash'}),
    'reinforce': ('switch_base.py:tiny', {'moe__router': 'reinforce'}),
    'sbase': ('switch_base.py:tiny', {'moe__router': 'sbase'}),   # token choice at eval
    'mod': ('mod_base.py:tiny', {}),
    'mode': ('mode_base.py:tiny', {}),
    'expert_choice_causal': ('expert_choice_base.py:tiny', {'moe__causal_rule': 'threshold'}),
    'mixtral_gqa': ('mixtral_like.py:tiny', {'model__num_kv_heads': 2}),
    'scanned_mode': ('mode_base.py:tiny', {'model__scan_layers': True}),
}
# The full suite runs these too; the quick set keeps one of each kind (token choice,
# MoD, GQA), and tests/test_sample.py decodes a trained MoDE both ways.
SLOW = ('expert_choice_causal', 'scanned_mode', 'topk', 'reinforce', 'sbase', 'hash', 'mode')


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in CAUSAL])
def test_greedy_decoding_with_the_cache_equals_recomputing(name):
  spec, overrides = CAUSAL[name]
  cfg = tiny(spec, **overrides)
  graphdef, params = nnx.split(build_model(cfg, VOCAB, 0), nnx.Param)
  routing = init_state(cfg)
  if 'threshold' in str(routing):
    # Thresholds a trained run would have: about a third of the experts pass.
    routing = jax.tree.map(lambda t: t + 0.25, routing)
  functions = decode.make_functions(graphdef)
  run = lambda kv: decode.generate(cfg, graphdef, params, PROMPTS, max_new_tokens=12,
                                   kv_cache=kv, routing=routing, functions=functions)[0]
  cached = run(True)
  assert cached == run(False)
  # Each row decodes as it would alone.
  alone = decode.generate(cfg, graphdef, params, PROMPTS[1:2], max_new_tokens=12,
                          routing=routing, functions=functions)[0]
  assert alone[0] == cached[1]
  if cfg.mod.enabled:
    # The MoD blocks chose some tokens and skipped others: the cache lengths differ.
    model = nnx.merge(graphdef, params)
    tokens = jnp.asarray([PROMPTS[1] + cached[1]], jnp.int32)
    _, aux = model(tokens, train=False)
    chosen = [float(v) for k, v in aux['metrics'].items() if k.endswith('mod_chosen')]
    assert chosen and all(0 < c < 1 for c in chosen), chosen


def test_the_window_must_hold_prompt_and_continuation():
  assert decode.fits([3, 10], 23, 32) and not decode.fits([3, 10], 24, 32)
  cfg = tiny('dense_base.py:tiny')
  graphdef, params = nnx.split(build_model(cfg, VOCAB, 0), nnx.Param)
  with pytest.raises(ValueError, match='train.seq_len = 32'):
    decode.generate(cfg, graphdef, params, [[1] * 10], max_new_tokens=24)


def test_sampling_filters_by_hand():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draw = jax.jit(jax.vmap(lambda key, t, k, p: decode.sample_logits(logits, key, t, k, p)[0],
                          in_axes=(0, None, None, None)))
  keys = jax.random.split(jax.random.key(0), 2000)
  seen = lambda t, k, p: np.bincount(np.asarray(draw(keys, t, k, p)), minlength=4) / len(keys)
  assert seen(0.0, 0, 1.0)[0] == 1                     # greedy
  assert seen(1.0, 1, 1.0)[0] == 1                     # top-1
  np.testing.assert_allclose(seen(1.0, 2, 1.0), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.04)
  # top_p 0.7: 0.5 alone falls short, 0.5 + 0.3 reaches it: the two most likely.
  np.testing.assert_allclose(seen(1.0, 0, 0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.04)
  np.testing.assert_allclose(seen(1.0, 0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.04)
  # top_k 3 then top_p 0.9 over the renormalised three (0.53, 0.32, 0.16): 0.53 + 0.32
  # falls short, so all three stay (top_p alone, 0.5 + 0.3 + 0.15 = 0.95, would too).
  np.testing.assert_allclose(seen(1.0, 3, 0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
                             atol=0.04)
  # top_k 3 then top_p 0.8: 0.53 + 0.32 = 0.84 reaches it: two stay (top_p alone: two).
  np.testing.assert_allclose(seen(1.0, 3, 0.8), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.04)
  # top_k 2 then top_p 0.6: renormalised, the first holds 0.625 >= 0.6 and stays alone
  # (over the full distribution it would hold 0.5 and take the second along).
  assert seen(1.0, 2, 0.6)[0] == 1
  # Temperature 0.5 squares the probabilities (before normalising).
  sq = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
  np.testing.assert_allclose(seen(0.5, 0, 1.0), sq / sq.sum(), atol=0.04)
