"""Linear probes on frozen features: multinomial logistic regression (L2-regularised, L-BFGS)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float = 1e-3,
                     steps: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Fits softmax regression on standardised features.

  Args: features (N, F) float, labels (N,) int in [0, num_classes).
  Returns (weights (F, C), bias (C,), feature mean (F,), feature std (F,)).
  """
  x = np.asarray(features, np.float32)
  mean, std = x.mean(0), x.std(0) + 1e-6
  x = jnp.asarray((x - mean) / std)
  y = jax.nn.one_hot(jnp.asarray(labels), num_classes)

  def loss(params):
    w, b = params
    return optax.softmax_cross_entropy(x @ w + b, y).mean() + l2 * jnp.sum(w**2)

  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  solver = optax.lbfgs()
  state = solver.init(params)
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def update(params, state):
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = update(params, state)
  w, b = params
  return np.asarray(w), np.asarray(b), mean, std


def probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                   test_labels: np.ndarray, num_classes: int) -> float:
  """Accuracy on the test features of a linear probe fitted on the train features."""
  w, b, mean, std = fit_linear_probe(train_features, train_labels, num_classes)
  logits = ((np.asarray(test_features, np.float32) - mean) / std) @ w + b
  return float(np.mean(logits.argmax(-1) == np.asarray(test_labels)))
