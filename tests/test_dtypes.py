"""Mixed precision: bfloat16 compute with float32 parameters and float32 router math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed.config import base_config
from routed.model.transformer import build_model


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32():
  cfg = base_config()
  cfg.model.update(d_model=32, num_heads=4, num_layers=2, d_ff=64)
  cfg.moe.update(num_experts=4, capacity_factor=4.0, eval_capacity_factor=4.0)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
  logits32, _ = build_model(cfg, 50, seed=0)(tokens, train=False)
  cfg.model.compute_dtype = 'bfloat16'
  model = build_model(cfg, 50, seed=0)
  params = nnx.state(model, nnx.Param)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # master weights
  logits16, aux = model(tokens, train=False)
  assert logits16.dtype == jnp.float32
  assert aux['losses']['z'].dtype == jnp.float32  # the router ran in float32
  # Same routing decisions in both precisions here, so outputs agree to bf16 precision.
  np.testing.assert_allclose(logits16, logits32, atol=0.05, rtol=0.05)
