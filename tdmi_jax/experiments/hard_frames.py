r"""The synthetic hard-frame benchmark: TDMI against a single-frame baseline, MI ablations.

Command (from the repository root; 150 steps per model, 2 seeds: about 70 minutes of a
2-core CPU shared with other jobs, ~3 min per single-frame model, ~9 per TDMI model):

  python -m tdmi_jax.experiments.hard_frames --workdir runs/hard_frames

Seeds can run as separate processes on one workdir (`--seeds 0` and `--seeds 1`); a final
run of the plain command then only gathers the cached results into the tables.

Smoke run (tiny dataset, a few steps, one seed; what tests/test_hard_frames.py runs):

  python -m tdmi_jax.experiments.hard_frames --workdir /tmp/hf --quick

Protocol, per seed (same steps, batch, lr schedule and seed for every variant):
  1. single_frame: arch='single_frame' (tiny HRNet + its own head on the key frame),
     trained from scratch on the synthetic train split, backbone live (BatchNorm 'live').
     It is the baseline and also the pretrained backbone of the TDMI variants.
  2.-5. tdmi_no_mi (mi.enabled=False), tdmi_kl (mi.divergence='kl'), tdmi_reference
     (mi.divergence='reference'), tdmi_club (mi.estimator='club'): arch='tdmi' with the
     backbone of step 1 (init_from, kind 'backbone'), frozen with frozen BatchNorm as in
     the paper.
Every model is evaluated with the project's PoseTrack mAP on val detector boxes; the clean
and degraded key-frame subsets come from train.py's eval (eval_results.json 'subsets').

Outputs under --workdir: data/ (the dataset, generated once and shared by every run),
runs/<variant>_s<seed>/ (each training workdir and its result.json; a finished run is not
run again, so an interrupted experiment resumes), results.json ({variant: {'clean': {Head
.. Total}, 'degraded': {...}}}, means over seeds), results.md (mean ± std table) and
results.png (bar chart of Total).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from configs import synthetic as synthetic_config
from tdmi_jax import keypoints
from tdmi_jax import train
from tdmi_jax.data import input_pipeline

VARIANTS = ('single_frame', 'tdmi_no_mi', 'tdmi_kl', 'tdmi_reference', 'tdmi_club')
SUBSETS = ('clean', 'degraded')
COLUMNS = keypoints.SUMMARY_COLUMNS
# Steps per model and seeds of the full experiment (a TDMI step takes ~1.7-2.5 s at batch
# 16 on the shared 2-core CPU). Clipping (same for all) only bounds the MI variants' steps;
# the baseline's gradient norms are ~0.01.
FULL = dict(steps=150, seeds=(0, 1), grad_clip_norm=1.0)
QUICK = dict(steps=3, seeds=(0,), grad_clip_norm=1.0)


def make_config(variant, seed, steps, data_root, grad_clip_norm, quick, pretrained='',
                mi_weight=1.0):
  """The training config of one (variant, seed): configs/synthetic.py plus the protocol."""
  config = synthetic_config.get_config('runlocal' if quick else None).unlock()
  config.seed = seed
  config.data.manual_dir = os.path.join(data_root, 'synthetic')
  config.data.data_dir = os.path.join(data_root, 'tfds')
  config.num_train_steps = steps
  # One lr decay (x0.1) at 75% of the run, the shape of configs/synthetic.py's schedule.
  config.optim.decay_epochs = ()
  config.optim.grad_clip_norm = grad_clip_norm
  config.eval_every_steps = 0
  config.checkpoint.every_steps = steps
  config.checkpoint.max_to_keep = 1
  config.eval.num_overlays = 0
  config.log_every_steps = max(1, min(config.log_every_steps, steps // 10 or 1))
  if variant == 'single_frame':
    config.model.arch = 'single_frame'
    config.model.backbone.frozen = False
    config.model.backbone.bn = 'live'
  else:
    config.model.arch = 'tdmi'
    config.model.backbone.frozen = True
    config.model.backbone.bn = 'frozen'
    config.init_from = pretrained
    config.init_from_kind = 'backbone'
    config.mi.enabled = variant != 'tdmi_no_mi'
    config.mi.divergence = 'reference' if variant == 'tdmi_reference' else 'kl'
    config.mi.estimator = 'club' if variant == 'tdmi_club' else 'divergence'
    config.mi.alpha = config.mi.beta = config.mi.gamma = mi_weight
  return config


def _decay_at(config, steps, data_root):
  """Puts the single x0.1 decay at 75% of `steps`, in epochs (decay_epochs' unit)."""
  input_pipeline.prepare_data(config, data_root)  # Synthesises the shared dataset on first use.
  n = input_pipeline.TrainData(config.data, config.batch_size, config.seed).num_examples
  steps_per_epoch = max(1, n // config.batch_size)
  config.optim.decay_epochs = (0.75 * steps / steps_per_epoch,) if steps >= 4 else ()


def run_one(variant, seed, args, data_root, runs_root, pretrained=''):
  """Trains and evaluates one model; returns its result dict (cached in result.json)."""
  workdir = os.path.join(runs_root, f'{variant}_s{seed}')
  result_path = os.path.join(workdir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  config = make_config(variant, seed, args.steps, data_root, args.grad_clip_norm, args.quick,
                       pretrained, args.mi_weight)
  _decay_at(config, args.steps, data_root)
  start = time.perf_counter()
  result = {'variant': variant, 'seed': seed, 'steps': args.steps, 'status': 'ok'}
  try:
    metrics = train.train_and_evaluate(config, workdir, 'train_and_eval')
  except train.NonFiniteLossError as e:
    # Reported, not hidden: the variant scores nothing at this budget.
    print(f'{variant} seed {seed} diverged: {e}', flush=True)
    result['status'] = 'diverged'
    result['error'] = str(e)[:2000]
    metrics = {}
  if 'stopped_at' in metrics:
    # SIGTERM/SIGINT: the run checkpointed and stopped early; no result is cached, so a
    # rerun of the experiment resumes this run from its checkpoint.
    raise SystemExit(f'{variant} seed {seed} stopped by a signal at step '
                     f'{metrics["stopped_at"]}; rerun the same command to resume.')
  result['wall_s'] = time.perf_counter() - start
  ev = metrics.get('eval', {})
  result['train'] = {k: float(v) for k, v in metrics.get('train', {}).items()}
  result['pck'] = ev.get('pck')
  for subset in SUBSETS:
    # A diverged run predicts nothing: mAP 0 (what poseval gives for no predictions).
    result[subset] = {c: float(ev.get(f'map_{subset}/{c}', 0.0)) for c in COLUMNS}
  result['all'] = {c: float(ev.get(f'map/{c}', 0.0)) for c in COLUMNS}
  os.makedirs(workdir, exist_ok=True)
  with open(result_path, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  return result


def aggregate(per_run):
  """{variant: {subset: {col: (mean, std, n)}}} over the seeds that ran."""
  out = {}
  for variant in VARIANTS:
    runs = [r for r in per_run if r['variant'] == variant]
    if not runs:
      continue
    out[variant] = {}
    for subset in SUBSETS:
      out[variant][subset] = {}
      for c in COLUMNS:
        vals = np.array([r[subset][c] for r in runs], np.float64)
        vals = np.nan_to_num(vals, nan=0.0)
        out[variant][subset][c] = (float(vals.mean()), float(vals.std(ddof=1))
                                   if len(vals) > 1 else 0.0, len(vals))
  return out


def write_outputs(workdir, per_run, command, wall_s, wall_note=''):
  """results.json (means), results.md (mean ± std), results.png."""
  agg = aggregate(per_run)
  means = {v: {s: {c: round(agg[v][s][c][0], 2) for c in COLUMNS} for s in SUBSETS}
           for v in agg}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(means, f, indent=2)
  lines = [f'# Synthetic hard-frame benchmark', '',
           f'Command: `{command}`', '',
           'PoseTrack mAP (%) on the synthetic val split, detector boxes; mean ± std over '
           'seeds (n = number of seeds).', '']
  for subset in SUBSETS:
    lines += [f'## {subset.capitalize()} key frames', '',
              '| Model | n | ' + ' | '.join(COLUMNS) + ' |',
              '|---|---|' + '---|' * len(COLUMNS)]
    for v in agg:
      cells = [f'{agg[v][subset][c][0]:.1f} ± {agg[v][subset][c][1]:.1f}' for c in COLUMNS]
      lines.append(f'| {v} | {agg[v][subset]["Total"][2]} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  lines += ['## Runs', '', '| Run | status | wall (s) | final train loss | heatmap loss | '
            'clean Total | degraded Total |', '|---|---|---|---|---|---|---|']
  for r in per_run:
    tr = r.get('train', {})
    lines.append(f'| {r["variant"]} s{r["seed"]} | {r["status"]} | {r["wall_s"]:.0f} | '
                 f'{tr.get("loss", float("nan")):.4g} | '
                 f'{tr.get("heatmap_loss", float("nan")):.4g} | '
                 f'{r["clean"]["Total"]:.1f} | {r["degraded"]["Total"]:.1f} |')
  lines += ['', f'Wall time: {wall_s / 60:.1f} min{wall_note}.', '']
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines))
  _plot(agg, os.path.join(workdir, 'results.png'))
  return means


def _plot(agg, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  variants = list(agg)
  x = np.arange(len(variants))
  fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
  for i, subset in enumerate(SUBSETS):
    m = [agg[v][subset]['Total'][0] for v in variants]
    s = [agg[v][subset]['Total'][1] for v in variants]
    ax.bar(x + (i - 0.5) * 0.38, m, 0.38, yerr=s, capsize=3, label=f'{subset} key frames')
  ax.set_xticks(x, variants, rotation=15)
  ax.set_ylabel('mAP Total (%)')
  ax.set_title('Synthetic val, detector boxes (mean ± std over seeds)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--quick', action='store_true',
                      help='tiny dataset, a few steps, one seed (smoke test)')
  parser.add_argument('--steps', type=int, default=None, help='training steps per model')
  parser.add_argument('--seeds', type=str, default=None, help='comma-separated seeds')
  parser.add_argument('--grad_clip_norm', type=float, default=None,
                      help='global-norm gradient clipping, the same for every variant')
  parser.add_argument('--variants', type=str, default=','.join(VARIANTS))
  parser.add_argument('--mi_weight', type=float, default=1.0,
                      help='mi.alpha = mi.beta = mi.gamma of the MI variants (SPEC: 1)')
  parser.add_argument('--report_only', action='store_true',
                      help='train nothing: tabulate the finished runs found under --workdir')
  args = parser.parse_args(argv)
  defaults = QUICK if args.quick else FULL
  args.steps = args.steps or defaults['steps']
  seeds = tuple(int(s) for s in args.seeds.split(',')) if args.seeds else defaults['seeds']
  if args.grad_clip_norm is None:
    args.grad_clip_norm = defaults['grad_clip_norm']
  variants = [v for v in args.variants.split(',') if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f'--variants: unknown {unknown}; known: {VARIANTS}')
  workdir = os.path.abspath(args.workdir)
  data_root = os.path.join(workdir, 'data')
  runs_root = os.path.join(workdir, 'runs')
  os.makedirs(runs_root, exist_ok=True)
  command = 'python -m tdmi_jax.experiments.hard_frames ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  per_run = []
  if args.report_only:
    for seed in seeds:
      for variant in VARIANTS:
        path = os.path.join(runs_root, f'{variant}_s{seed}', 'result.json')
        if variant in variants and os.path.exists(path):
          with open(path) as f:
            per_run.append(json.load(f))
    wall = sum(r['wall_s'] for r in per_run)
    return write_outputs(workdir, per_run, command, wall,
                         ' (sum over the runs; runs of different seeds may have overlapped)')
  for seed in seeds:
    base = run_one('single_frame', seed, args, data_root, runs_root)
    per_run.append(base)
    if base['status'] != 'ok':
      raise RuntimeError(f'The single-frame pretraining of seed {seed} diverged; nothing '
                         'to initialise TDMI from.')
    pretrained = os.path.join(runs_root, f'single_frame_s{seed}')
    for variant in variants:
      if variant != 'single_frame':
        per_run.append(run_one(variant, seed, args, data_root, runs_root, pretrained))
      # Partial tables after every run: an interrupted experiment still shows its numbers.
      write_outputs(workdir, per_run, command, time.perf_counter() - start)
  if 'single_frame' not in variants:
    per_run = [r for r in per_run if r['variant'] != 'single_frame']
  means = write_outputs(workdir, per_run, command, time.perf_counter() - start)
  print(open(os.path.join(workdir, 'results.md')).read())
  return means


if __name__ == '__main__':
  main()
