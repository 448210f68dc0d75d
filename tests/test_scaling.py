"""routed.scaling: the law's algebra, fits that recover known coefficients, the fit on the
paper's released runs against its published table, bootstrap intervals and the CLI."""

import functools
import gzip
import http.server
import json
import math
import os
import threading

import numpy as np
import pytest

from routed.scaling import (PUBLISHED, PUBLISHED_DENSE, ScalingPoints, UnifiedLaw,
                            bootstrap_unified, e_hat, final_step, fit_dense, fit_unified,
                            load_curves, rmse_of, select)
from routed.scaling import cli as scaling_cli
from routed.scaling import expert_load, report
from routed.scaling.curves import COLUMNS, parse_csv, write_curves
from routed.scaling.fit import log10_e_hat_and_grad, residuals_and_jacobian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CI runs in a fresh clone with a copy of shared/ beside it.
PAPER_CURVES = os.path.join(ROOT, '..', 'shared', 'data', 'clark2022', 'curves.csv.gz')
needs_paper_data = pytest.mark.skipif(
    not os.path.exists(PAPER_CURVES),
    reason=f'the paper\'s released curves are not at {PAPER_CURVES} (shared/ beside the repo)')


def synthetic_points(law: UnifiedLaw, noise: float = 0.0, seed: int = 0) -> ScalingPoints:
  """The paper's grid (6 sizes x E in 1..512) with losses from `law` and Gaussian noise
  of std `noise` on log10 L."""
  n = np.array([16.5e6, 27.3e6, 57.4e6, 132e6, 368e6, 1309e6])
  e = 2.0 ** np.arange(10)
  nn, ee = (a.ravel() for a in np.meshgrid(n, e))
  log_loss = law.log10_loss(nn, ee) + np.random.default_rng(seed).normal(0, noise, nn.shape)
  labels = np.array([''] * len(nn))
  return ScalingPoints(n=nn, e=ee, loss=10.0 ** log_loss, hyper_id=labels,
                       router_type=np.where(ee == 1, 'Dense', 'S-Base'), model_size_label=labels)


def test_e_hat_by_hand():
  # E_start 2, E_max 100: offset (1/2 - 1/100)^-1 = 100/49; 3 - 1 + 100/49 = 198/49;
  # Ê(3) = 1 / (49/198 + 1/100) = 19800/5098 = 3.883876.
  assert e_hat(3, 2.0, 100.0) == pytest.approx(19800 / 5098, rel=1e-12)
  assert e_hat(1, 2.0, 100.0) == pytest.approx(2.0)  # Ê(1) = E_start
  big = e_hat(np.array([1e3, 1e6, 1e9]), 2.0, 100.0)
  assert np.all(np.diff(big) > 0) and big[-1] == pytest.approx(100.0, rel=1e-6)
  with pytest.raises(ValueError):
    e_hat(2, 10.0, 5.0)


def test_jacobian_matches_finite_differences():
  rng = np.random.default_rng(0)
  x = rng.uniform(7, 9, 20)
  e = 2.0 ** rng.integers(0, 10, 20)
  y = rng.uniform(0.3, 0.5, 20)
  theta = np.array([-0.08, -0.11, 0.009, 1.1, math.log2(1.8), math.log2(300 / 1.8)])
  _, jac = residuals_and_jacobian(theta, x, e, y)
  for j in range(6):
    step = np.zeros(6)
    step[j] = 1e-6
    numeric = (residuals_and_jacobian(theta + step, x, e, y)[0] -
               residuals_and_jacobian(theta - step, x, e, y)[0]) / 2e-6
    np.testing.assert_allclose(jac[:, j], numeric, rtol=1e-5, atol=1e-9)
  u, _, _ = log10_e_hat_and_grad(e, theta[4], theta[5])
  np.testing.assert_allclose(u, np.log10(e_hat(e, 1.8, 300.0)), rtol=1e-12)


def test_effective_params_and_cutoff_identities():
  law = PUBLISHED['S-Base']
  n, e = np.array([1e7, 1e8, 1e9]), np.array([8.0, 64.0, 512.0])
  n_bar = law.effective_params(n, e)
  # A dense model of N̄ parameters has the routed model's loss; at E = 1 N̄ = N.
  np.testing.assert_allclose(law.log10_loss(n_bar, 1), law.log10_loss(n, e), atol=1e-12)
  np.testing.assert_allclose(law.effective_params(n, 1), n, rtol=1e-12)
  assert np.all(n_bar > n)  # routing helps below N_cutoff
  # b + c log10 N_cutoff = 0; from the rounded table 10^(0.108/0.009) = 1e12.
  assert law.n_cutoff == pytest.approx(1e12, rel=1e-9)
  assert law.b + law.c * math.log10(law.n_cutoff) == pytest.approx(0, abs=1e-12)
  assert law.routing_helps(1e11) and not law.routing_helps(1e13)
  assert UnifiedLaw(-0.1, -0.1, 0.0, 1.0, 2.0, 100.0).n_cutoff == math.inf


@pytest.mark.parametrize('router', ['S-Base', 'Hash'])
def test_fit_recovers_known_coefficients(router):
  truth = PUBLISHED[router]
  fit = fit_unified(synthetic_points(truth))
  assert fit.rmse < 1e-7
  for name, value in truth.as_dict().items():
    assert getattr(fit.law, name) == pytest.approx(value, rel=1e-4), name
  # Noise of 0.001 in log10 L (the paper's fits leave 0.003): the coefficients move by
  # about their bootstrap spread, well inside the tolerances of the published table.
  noisy = fit_unified(synthetic_points(truth, noise=0.001, seed=1))
  assert noisy.rmse == pytest.approx(0.001, rel=0.25)
  for name, tol in (('a', 0.002), ('b', 0.012), ('c', 0.001), ('d', 0.02)):
    assert getattr(noisy.law, name) == pytest.approx(getattr(truth, name), abs=tol), name


def test_fit_with_fixed_saturation():
  # Ê = E (E_start 1, E_max inf) on a CPU-sweep-like grid: 3 sizes x E in {1, 2, 4, 8}.
  truth = UnifiedLaw(a=-0.07, b=-0.04, c=0.005, d=0.91, e_start=1.0, e_max=math.inf)
  n = np.repeat([24736.0, 98624.0, 221664.0], 4)
  e = np.tile([1.0, 2.0, 4.0, 8.0], 3)
  assert np.allclose(e_hat(e, 1.0, math.inf), e)
  labels = np.array([''] * 12)
  points = ScalingPoints(n, e, truth.loss(n, e), labels, labels, labels)
  fit = fit_unified(points, saturation=(1, math.inf))
  assert fit.saturation_fixed and fit.law.e_max == math.inf and fit.law.e_start == 1.0
  for name in 'abcd':
    assert getattr(fit.law, name) == pytest.approx(getattr(truth, name), abs=1e-9), name
  rf = report.RouterFit('x', points, fit, bootstrap_unified(points, fit, n_boot=5,
                                                             saturation=(1, math.inf)))
  slope, (lo, hi) = report.routing_slope(rf, 1e5)
  assert slope == pytest.approx(-0.04 + 0.005 * 5) and lo <= slope <= hi
  with pytest.raises(ValueError, match='E_start < E_max'):
    fit_unified(points, saturation=(8, 4))


def test_huber_objective_ignores_an_outlier():
  truth = PUBLISHED['RL-R']
  points = synthetic_points(truth, noise=0.0005, seed=2)
  loss = points.loss.copy()
  loss[17] *= 1.5  # one diverged run
  points = ScalingPoints(points.n, points.e, loss, points.hyper_id, points.router_type,
                         points.model_size_label)
  l2, huber = fit_unified(points), fit_unified(points, objective='huber', huber_delta=1e-3)
  assert abs(huber.law.b - truth.b) < 0.01 < abs(l2.law.b - truth.b) + 0.01
  assert abs(huber.law.b - truth.b) < abs(l2.law.b - truth.b)


def test_bootstrap_intervals_cover_truth():
  truth = PUBLISHED['S-Base']
  points = synthetic_points(truth, noise=0.002, seed=3)
  fit = fit_unified(points)
  ci = bootstrap_unified(points, fit, n_boot=40, seed=0)
  for name in ('a', 'b', 'c', 'd'):
    lo, hi = ci.bounds[name]
    assert lo <= getattr(fit.law, name) <= hi, name
    assert lo - 0.01 <= getattr(truth, name) <= hi + 0.01, name
  assert set(ci.as_dict()) == {'a', 'b', 'c', 'd', 'e_start', 'e_max', 'n_cutoff'}


def test_dense_law_recovers_known_exponent():
  n = np.array([1e7, 3e7, 1e8, 3e8, 1e9])
  fit = fit_dense(n, PUBLISHED_DENSE.loss(n))
  assert fit.law.alpha_n == pytest.approx(0.078, rel=1e-9)
  assert fit.law.n_c == pytest.approx(3.568e13, rel=1e-6)


def test_curves_io_and_final_step(tmp_path):
  rows = [
      {'hyper_id': 'a', 'step': 10, 'loss_validation': 3.0, 'router_type': 'Dense'},
      {'hyper_id': 'a', 'step': 20, 'loss_validation': 2.5, 'router_type': 'Dense'},
      {'hyper_id': 'a', 'step': 30, 'loss_validation': math.nan, 'router_type': 'Dense'},
      {'hyper_id': 'b', 'step': 10, 'loss_validation': 4.0, 'router_type': 'Hash'},
  ]
  path = str(tmp_path / 'curves.csv')
  write_curves(path, rows)
  with open(path) as f:
    assert f.readline().strip().split(',') == list(COLUMNS)
  curves = load_curves(path)
  with open(path, 'rb') as f:
    zipped = parse_csv(gzip.compress(f.read()))
  np.testing.assert_array_equal(zipped['step'], curves['step'])
  final = final_step(curves)
  # Run a's last step has no loss: its last finite evaluation (step 20) stands for it.
  assert dict(zip(final['hyper_id'], final['step'])) == {'a': 20.0, 'b': 10.0}
  assert final['hyper_id'].dtype.kind == 'U' and math.isnan(final['loss_c4'][0])


def test_load_curves_from_url(tmp_path):
  rows = [{'hyper_id': 'x', 'step': 5, 'loss_validation': 1.5}]
  write_curves(str(tmp_path / 'curves.csv'), rows)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    curves = load_curves(f'http://127.0.0.1:{server.server_port}/curves.csv')
  finally:
    server.shutdown()
  assert curves['hyper_id'].tolist() == ['x'] and curves['loss_validation'].tolist() == [1.5]


@pytest.fixture(scope='module')
def paper_curves():
  return load_curves(PAPER_CURVES)


@needs_paper_data
def test_paper_selection_matches_published_rmse(paper_curves):
  points = select(paper_curves, 'S-Base')
  # 53 S-Base runs + the 5 dense runs of seed 42 (15M, 25M, 55M, 370M, 1.3B).
  assert len(points) == 58 and np.sum(points.router_type == 'Dense') == 5
  # routing-facts.md: the published S-BASE coefficients give 0.0037 on these points.
  assert rmse_of(PUBLISHED['S-Base'], points) == pytest.approx(0.0037, abs=1e-4)


# Done means: within ±0.01 of the published a and d, ±0.015 of b, ±0.004 of c, and an
# RMSE no worse than the published coefficients' (0.0037).
@needs_paper_data
@pytest.mark.parametrize('router', ['S-Base', 'RL-R', 'Hash'])
def test_paper_fit_matches_published_table(paper_curves, router):
  points = select(paper_curves, router)
  fit = fit_unified(points)
  published = PUBLISHED[router]
  assert fit.law.a == pytest.approx(published.a, abs=0.01)
  assert fit.law.b == pytest.approx(published.b, abs=0.015)
  assert fit.law.c == pytest.approx(published.c, abs=0.004)
  assert fit.law.d == pytest.approx(published.d, abs=0.01)
  assert fit.rmse <= 0.0037
  assert fit.rmse <= rmse_of(published, points)
  assert not fit.at_bounds


@needs_paper_data
def test_paper_dense_law(paper_curves):
  dense = select(paper_curves, 'Dense')
  fit = fit_dense(dense.n, dense.loss)
  assert fit.law.alpha_n == pytest.approx(PUBLISHED_DENSE.alpha_n, abs=0.002)
  assert fit.law.n_c == pytest.approx(PUBLISHED_DENSE.n_c, rel=0.2)


@needs_paper_data
def test_cli_fit_prints_one_json_object(capsys):
  assert scaling_cli.main(['fit', f'--curves={PAPER_CURVES}', '--router=Hash',
                           '--bootstrap=10']) == 0
  out = json.loads(capsys.readouterr().out)
  for key in ('a', 'b', 'c', 'd', 'e_start', 'e_max', 'rmse', 'n_cutoff', 'intervals'):
    assert key in out
  assert out['router'] == 'Hash' and out['n_points'] == 56
  lo, hi = out['intervals']['b']
  assert lo <= out['b'] <= hi


@pytest.mark.parametrize('argv, message', [
    ([], 'give a command first'),
    (['fit', '--e_start=1'], '--e_start and --e_max go together'),
    (['fit', '--curves=/no/such/file.csv'], '--curves: cannot read'),
    (['fit', '--objective=l1', '--curves=x'], '--objective'),
    (['fit', '--bogus=1'], 'unknown flag --bogus'),
])
def test_cli_bad_input_is_one_line(capsys, argv, message):
  assert scaling_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1


@needs_paper_data
def test_cli_unknown_router(capsys):
  assert scaling_cli.main(['fit', f'--curves={PAPER_CURVES}', '--router=Switch']) == 2
  err = capsys.readouterr().err
  assert 'no runs of router_type' in err and err.count('\n') == 1


def test_expert_load_statistics_by_hand():
  metrics = [
      {'step': 10, 'train/moe/layer1/expert_load': [0.25, 0.25, 0.25, 0.25],
       'train/moe/layer1/entropy': math.log(4), 'train/moe/layer1/dropped': 0.0},
      {'step': 20, 'train/moe/layer1/expert_load': [1.0, 0.0, 0.0, 0.0],
       'train/moe/layer1/entropy': 0.0, 'train/moe/layer1/dropped': 0.5,
       'eval/ce': 3.0, 'eval/moe/layer1/expert_load': [0.5, 0.5, 0.0, 0.0]},
  ]
  (train,) = expert_load.layer_histories(metrics, 'train')
  (evaluation,) = expert_load.layer_histories(metrics, 'eval')
  assert train.layer == 1 and train.steps.tolist() == [10, 20]
  # Balanced: max load 4 x 0.25 = 1, entropy ln 4 / ln 4 = 1, confidence 1 - 1 = 0;
  # one expert: max load 4, load entropy 0, confidence 1.
  np.testing.assert_allclose(train.max_load, [1.0, 4.0])
  np.testing.assert_allclose(train.load_entropy, [1.0, 0.0], atol=1e-9)
  np.testing.assert_allclose(train.confidence, [0.0, 1.0])
  # Two experts of four: ln 2 / ln 4 = 0.5; no entropy logged at eval.
  np.testing.assert_allclose(evaluation.load_entropy, [0.5], atol=1e-9)
  assert np.isnan(evaluation.confidence[0])
