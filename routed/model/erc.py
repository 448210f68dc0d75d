"""The expert-router coupling (ERC) loss: each expert should answer most to its own
router embedding, and each router embedding should excite its own expert most.

Shape letters as in routers.py: E experts, D d_model, F expert d_ff.

A linear router scores expert e by x . r_e, so r_e (column e of the router kernel
[D, E]) is the direction in which the router sends tokens to e: expert e's router
embedding. ERC ("Coupling Experts and Routers in Mixture-of-Experts via an Auxiliary
Loss") turns each embedding, perturbed, into a proxy token and runs it through every
expert's first layer:

  proxy_i  = r_i * (1 + u),  u ~ U(-noise, noise) per coordinate   (moe.erc_noise)
  M[i, j]  = || act(proxy_i @ W_in^j) ||_2                         [E, E]

that is, how strongly expert j responds to the tokens the router sends to expert i.
The loss asks the diagonal to dominate both its row and its column:

  ERC = 1 / (E (E - 1)) * sum_{i != j} [ relu(M[i, j] - M[i, i])    proxy i excites its
                                                                      own expert most
                                          + relu(M[i, j] - M[j, j]) ]  expert j answers
                                                                      its own proxy most

It costs E^2 proxy activations per MoE layer and step (one [E, D] x [E, D, F] product),
independent of the batch size, and trains both the router kernel and the experts'
input weights. Metric `erc_coupled`: the share of experts whose M[i, i] is the
largest of its row and of its column (1.0 = every expert coupled to its embedding).
Routers without a linear kernel (soft, hash) cannot take it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def response_matrix(router_embeddings, wi, act):
  """M [E, E]: M[i, j] = || act(proxy_i @ wi[j]) ||. router_embeddings [E, D] (the
  proxies), wi [E, D, W] (the experts' input weights), act the hidden activation."""
  h = act(jnp.einsum('id,jdw->ijw', router_embeddings, wi))          # [E, E, F]
  return jnp.sqrt(jnp.sum(jnp.square(h.astype(jnp.float32)), axis=-1) + 1e-12)


def erc_loss(kernel, wi, act, *, noise: float, rng=None):
  """(ERC loss, erc_coupled) for a router kernel [D, >= E] and experts' wi [E, D, W]."""
  e = wi.shape[0]
  proxies = kernel[:, :e].T.astype(jnp.float32)                      # [E, D]
  if rng is not None and noise > 0:
    proxies = proxies * jax.random.uniform(rng, proxies.shape, jnp.float32, 1 - noise,
                                           1 + noise)
  m = response_matrix(proxies.astype(wi.dtype), wi, act)
  diag = jnp.diagonal(m)
  off = 1.0 - jnp.eye(e, dtype=m.dtype)
  row = jax.nn.relu(m - diag[:, None]) * off      # proxy i on expert j vs on its own expert
  col = jax.nn.relu(m - diag[None, :]) * off      # expert j on proxy i vs on its own proxy
  loss = jnp.sum(row + col) / max(e * (e - 1), 1)
  masked = jnp.where(off > 0, m, -jnp.inf)
  coupled = (diag >= jnp.max(masked, axis=1)) & (diag >= jnp.max(masked, axis=0))
  return loss, jax.lax.stop_gradient(jnp.mean(coupled.astype(jnp.float32)))
