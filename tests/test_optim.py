"""The optimizer groups and schedules of resjax.train, on hand-made parameter trees."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resjax import train


def _config(**optim):
  c = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict(optim)
  return c


def _params():
  return {'weights': {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones((3,))},
          'scalars': {'lambda1': jnp.asarray(0.5)}}


STEPS = {'total': 100, 'warmup': 10, 'boundaries': [50]}


def _one_update(config, grads_value=0.0):
  tx = train.make_optimizer(config, STEPS)
  params = _params()
  grads = {k: {n: jnp.full_like(v, grads_value) for n, v in g.items()} for k, g in params.items()}
  updates, _ = tx.update(grads, tx.init(params), params)
  return params, updates


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_learnable_scalars_carry_no_weight_decay(name):
  config = _config(name=name, lr=0.1, weight_decay=0.5, momentum=0.9, warmup_lr=0.1,
                   warmup_shape='constant', decay='step', scalar_lr=0.02)
  _, updates = _one_update(config)  # zero gradients: only weight decay can move anything
  assert float(updates['scalars']['lambda1']) == 0.0
  assert np.all(np.asarray(updates['weights']['kernel']) < 0)  # decayed towards zero
  if name == 'adamw':  # AdamW decays matrices only, not biases
    assert np.all(np.asarray(updates['weights']['bias']) == 0)
  else:  # the ResNet papers' L2 reaches every weight
    assert np.all(np.asarray(updates['weights']['bias']) < 0)


def test_adamw_scalars_move_at_their_own_learning_rate():
  config = _config(name='adamw', lr=1e-3, weight_decay=0.0, scalar_lr=0.02, warmup_shape='linear',
                   decay='cosine')
  _, updates = _one_update(config, grads_value=1.0)
  # Adam's first step moves every parameter by its LR (times the warm-up factor 1/10 here).
  assert float(updates['scalars']['lambda1']) == pytest.approx(-0.02, rel=1e-4)
  assert float(updates['weights']['kernel'][0, 0]) == pytest.approx(-1e-4, rel=1e-4)


def test_schedules():
  step = train.learning_rate(ml_collections.ConfigDict(dict(
      lr=0.1, warmup_lr=0.01, decay='step', decay_factor=0.1)), STEPS)
  assert [float(step(s)) for s in (0, 9, 10, 49, 50, 99)] == pytest.approx(
      [0.01, 0.01, 0.1, 0.1, 0.01, 0.01])
  cos = train.learning_rate(ml_collections.ConfigDict(dict(
      lr=1.0, decay='cosine', warmup_shape='linear', final_lr_fraction=0.1)), STEPS)
  # Linear warm-up to the peak at step 9, then cosine from 1 to the floor 0.1 over steps 10..100.
  assert float(cos(0)) == pytest.approx(0.1) and float(cos(9)) == pytest.approx(1.0)
  assert float(cos(55)) == pytest.approx(0.55) and float(cos(100)) == pytest.approx(0.1)
  lin = train.learning_rate(ml_collections.ConfigDict(dict(lr=1.0, decay='linear')),
                            {'total': 100, 'warmup': 0, 'boundaries': []})
  assert float(lin(50)) == pytest.approx(0.5)
