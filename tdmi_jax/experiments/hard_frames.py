r"""The synthetic hard-frame study: does TDMI beat one frame on degraded key frames, and why.

Command (from the repository root; every variant x 3 seeds on the 2-core CPU, see
RESULTS.md for the measured wall time):

  python -m tdmi_jax.experiments.hard_frames --workdir runs/hard_frames

Smoke run (tiny dataset, two steps per model, one seed, every variant; what
tests/test_hard_frames.py runs):

  python -m tdmi_jax.experiments.hard_frames --workdir /tmp/hf --quick

Protocol (the paper's: a competent pretrained backbone, frozen):
  * Data: configs/synthetic.py's dataset (generator seed `synthetic.seed`, default 0), made
    once under --workdir/data; its val split has clean and degraded (blur, occlusion,
    defocus) key frames with clean neighbours.
  * `single_frame`: the shipped synthetic-pretrained backbone (tdmi_jax/weights) evaluated
    as it is, on the same detector boxes. It is not fine-tuned: it already had 3,000 steps
    on a larger synthetic train set of its own (configs/synthetic_backbone.py).
  * Every TDMI variant: configs/synthetic.py (backbone from the shipped weights, frozen,
    BatchNorm frozen) plus the variant's overrides (VARIANTS below), the same steps, batch,
    lr schedule and seeds. The seed sets the TDMI modules' initialisation and the order
    (and augmentation) of the training examples.
  * Feature cache (`--cache`, default on): with the backbone frozen its outputs for a
    given training example never change, so they are computed once per seed for the first
    `cache_examples` examples of the seed's (augmented) training stream and the steps read
    them instead of running the backbone. Steps within the cache see exactly the batches
    the plain driver would; later steps cycle through the cache. tests/test_hard_frames.py
    checks that a cached step gives the loss of the uncached one.
  * Scores: the project's PoseTrack mAP on val detector boxes, separately on clean and
    degraded key frames; mean and 95% t-interval over seeds; the paired per-seed
    difference against `single_frame` with its 95% t-interval.

Outputs under --workdir: data/, runs/<variant>_s<seed>/ (each run's eval files and
result.json; a finished run is not repeated, so an interrupted study resumes), results.json,
results.md, results.png. `--out DIR` also copies the three results files there (the
repository keeps them in results/hard_frames/).
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from configs import synthetic as synthetic_config
from tdmi_jax import keypoints
from tdmi_jax import sharding
from tdmi_jax import state as state_lib
from tdmi_jax import train_step as train_step_lib
from tdmi_jax.data import input_pipeline
from tdmi_jax.evaluation import map_eval
from tdmi_jax.models import tdmi

SUBSETS = ('clean', 'degraded')
COLUMNS = keypoints.SUMMARY_COLUMNS

# name -> (overrides of configs/synthetic.py, what it tests). `None` overrides: the shipped
# backbone evaluated alone. The variant whose overrides change nothing is the project
# default ('default_variant'); overrides are explicit so that the --quick (runlocal) runs,
# whose config differs, still mean the same thing.
VARIANTS = {
    'single_frame': (None, 'the shipped single-frame backbone'),
    'tdmi_no_mi': ({'mi.enabled': False}, 'TDMI, heatmap loss only (the default)'),
    'tdmi_reference': ({'mi.enabled': True, 'mi.objective': 'reference',
                        'mi.divergence': 'reference', 'model.rdm_noisy': 'gate',
                        'mi.alpha': 1.0, 'mi.beta': 1.0, 'mi.gamma': 1.0},
                       "reference surrogate at the SPEC's weight 1"),
    'tdmi_reference_w0.01': ({'mi.enabled': True, 'mi.objective': 'reference',
                              'mi.divergence': 'reference', 'model.rdm_noisy': 'gate',
                              'mi.alpha': 0.01, 'mi.beta': 0.01, 'mi.gamma': 0.01},
                             'reference surrogate at weight 0.01'),
    'tdmi_variational': ({'mi.enabled': True, 'model.useful_head': True},
                         'the variational objective (vCLUB + M_u task head)'),
    'tdmi_variational_no_club': ({'mi.enabled': True, 'model.useful_head': True,
                                  'mi.w_un': 0.0},
                                 'variational without vCLUB I(M_u;M_n)'),
    'tdmi_variational_no_task': ({'mi.enabled': True, 'mi.w_uy': 0.0},
                                 'variational without the M_u task head (vCLUB only)'),
    'tdmi_variational_gate': ({'mi.enabled': True, 'model.useful_head': True,
                               'model.rdm_noisy': 'gate'},
                              'variational with independent gates (M_n not tied)'),
    'tdmi_motion_only': ({'model.appearance': 'key_frame'},
                         'TDE motion only (appearance = key-frame feature)'),
    'tdmi_appearance_only': ({'model.motion': 'none'},
                             'appearance alignment only (no motion in the fusion)'),
    'tdmi_key_residual': ({'model.residual_base': 'key'},
                          "the fusion head corrects the key frame's heatmaps only"),
}
FULL = dict(steps=300, seeds=(0, 1, 2), cache_examples=4800)
QUICK = dict(steps=2, seeds=(0,), cache_examples=8)


def _set(config, dotted, value):
  node = config
  *parents, leaf = dotted.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value


def make_config(variant, seed, steps, data_root, quick):
  """The config of one (variant, seed): configs/synthetic.py plus the variant's overrides."""
  overrides, _ = VARIANTS[variant]
  config = synthetic_config.get_config('runlocal' if quick else None).unlock()
  config.seed = seed
  config.data.manual_dir = os.path.join(data_root, 'synthetic')
  config.data.data_dir = os.path.join(data_root, 'tfds')
  config.num_train_steps = steps
  config.optim.decay_epochs = ()
  config.optim.decay_steps = (int(0.75 * steps),) if steps >= 4 else ()
  config.eval.num_overlays = 0
  for k, v in (overrides or {}).items():
    _set(config, k, v)
  if overrides is None:
    config.model.arch = 'single_frame'
  return config


# --- Feature cache ---------------------------------------------------------------------


def cache_features(config, model, variables, num_examples, batch_size):
  """The backbone outputs of training examples 0..num_examples-1 of `config.seed`'s stream.

  Returns {'backbone_heatmaps': [N, 5, h, w, K], 'backbone_features': 4 x [N, 5, h, w, C],
  'target', 'target_weight'} as host numpy arrays.
  """
  data = input_pipeline.TrainData(config.data, batch_size, config.seed)
  apply = jax.jit(lambda v, x: tdmi.backbone_apply(model, v, x))
  chunks = []
  for step in tqdm.tqdm(range(num_examples // batch_size), desc='cache', leave=False):
    batch = data.batch(step)
    b, t = batch['frames'].shape[:2]
    hm, feats = apply(variables, jnp.asarray(batch['frames']).reshape(
        b * t, *batch['frames'].shape[2:]))
    split = lambda x: np.asarray(x).reshape(b, t, *x.shape[1:])
    chunks.append({'backbone_heatmaps': split(hm),
                   'backbone_features': tuple(split(f) for f in feats),
                   'target': batch['target'], 'target_weight': batch['target_weight']})
  return jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)


def cached_batch(cache, step, batch_size):
  """The batch of `step` from the cache: examples step*B .. step*B+B-1, cycling."""
  n = cache['target'].shape[0]
  idx = (np.arange(batch_size) + step * batch_size) % n
  batch = jax.tree.map(lambda x: x[idx], cache)
  batch['mask'] = np.ones((batch_size,), np.float32)
  return batch


# --- One variant, every seed ---------------------------------------------------------------


def _result_path(runs_root, variant, seed):
  return os.path.join(runs_root, f'{variant}_s{seed}', 'result.json')


def _scores(ev):
  out = {}
  for subset in SUBSETS:
    # A diverged run predicts nothing: mAP 0 (what poseval gives for no predictions).
    out[subset] = {c: float(ev.get(f'map_{subset}/{c}', 0.0)) for c in COLUMNS}
  out['all'] = {c: float(ev.get(f'map/{c}', 0.0)) for c in COLUMNS}
  return out


def run_variant(variant, seeds, args, data_root, runs_root, caches):
  """Trains and evaluates `variant` for every seed not already done; returns the results."""
  todo = [s for s in seeds if not os.path.exists(_result_path(runs_root, variant, s))]
  results = []
  if todo:
    config = make_config(variant, todo[0], args.steps, data_root, args.quick)
    mesh = sharding.make_mesh()
    input_pipeline.prepare_data(config, data_root)
    # The step is compiled once per variant and reused for every seed: the seed only
    # enters through the initial state and the data (the model has no dropout, so the
    # step's own rng, the one thing config.seed would change in it, is never drawn).
    model = tdmi.build_model(config.model)
    step_fn = eval_step = None
    for seed in todo:
      start = time.perf_counter()
      config = make_config(variant, seed, args.steps, data_root, args.quick)
      workdir = os.path.dirname(_result_path(runs_root, variant, seed))
      os.makedirs(workdir, exist_ok=True)
      n_train = input_pipeline.TrainData(config.data, config.batch_size, seed).num_examples
      _, state, mask, tx, schedule, club_tx = state_lib.create_state(
          config, mesh, max(1, n_train // config.batch_size))
      if eval_step is None:
        eval_step = train_step_lib.make_eval_step(model=model, mesh=mesh)
      result = {'variant': variant, 'seed': seed, 'steps': args.steps, 'status': 'ok'}
      metrics = {}
      if VARIANTS[variant][0] is not None:
        if step_fn is None:
          step_config = config.copy_and_resolve_references()
          step_config.seed = 0
          step_fn = train_step_lib.make_train_step(
              model=model, config=step_config, tx=tx, schedule=schedule, mask=mask,
              mesh=mesh, club_tx=club_tx)
        use_cache = args.cache
        if use_cache and seed not in caches:
          caches.clear()   # One seed's cache in memory at a time.
          caches[seed] = cache_features(config, model, jax.device_get(
              {'params': state.params, 'batch_stats': state.batch_stats}),
                                        args.cache_examples, config.batch_size)
        data = None if use_cache else input_pipeline.TrainData(
            config.data, config.batch_size, seed)
        for step in tqdm.trange(args.steps, desc=f'{variant} s{seed}', leave=False):
          batch = (cached_batch(caches[seed], step, config.batch_size) if use_cache
                   else data.batch(step))
          keys = (('backbone_heatmaps', 'backbone_features', 'target', 'target_weight',
                   'mask') if use_cache else train_step_lib.TRAIN_KEYS)
          state, metrics = step_fn(state, sharding.shard_batch(batch, mesh, keys))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in metrics.values()):
          result['status'] = 'diverged'
      ev = {}
      if result['status'] == 'ok':
        ev = map_eval.map_evaluation(config, workdir, args.steps,
                                     train_step_lib.make_predict_fn(state, eval_step, mesh))
      result.update(_scores(ev))
      result['train'] = metrics
      result['wall_s'] = time.perf_counter() - start
      with open(_result_path(runs_root, variant, seed), 'w') as f:
        json.dump(result, f, indent=2, sort_keys=True)
  for seed in seeds:
    with open(_result_path(runs_root, variant, seed)) as f:
      results.append(json.load(f))
  return results


# --- Statistics and reports -------------------------------------------------------------

# Two-sided 95% Student t quantiles by degrees of freedom (n - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}


def mean_ci(values):
  """(mean, half-width of the 95% t-interval) of a list; half-width 0 for one value."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), 0.0
  t = _T95.get(len(v) - 1, 1.96)
  return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))


def paired_difference(per_seed, baseline, subset):
  """Per-seed (variant - baseline) Totals on `subset`, their mean and 95% t-interval.

  per_seed, baseline: {seed: {'clean': Total, 'degraded': Total}}. A baseline with a
  single entry (a deterministic model, e.g. the shipped backbone) is paired with every seed.
  """
  seeds = sorted(per_seed)
  base = {s: baseline[s] if s in baseline else next(iter(baseline.values())) for s in seeds}
  diffs = [per_seed[s][subset] - base[s][subset] for s in seeds]
  mean, half = mean_ci(diffs)
  return {'mean': mean, 'ci95': [mean - half, mean + half],
          'per_seed': {str(s): d for s, d in zip(seeds, diffs)}}


def aggregate(per_run, default_variant):
  """The results.json document (see the module docstring of RESULTS.md's schema)."""
  variants = {}
  for name in VARIANTS:
    runs = [r for r in per_run if r['variant'] == name]
    if not runs:
      continue
    overrides = VARIANTS[name][0]
    entry = {'description': VARIANTS[name][1],
             'mi_enabled': bool(overrides is not None and overrides.get(
                 'mi.enabled', synthetic_config.get_config().mi.enabled)),
             'n': len(runs),
             'status': sorted({r['status'] for r in runs})}
    for subset in SUBSETS:
      entry[subset] = {c: mean_ci([r[subset][c] for r in runs])[0] for c in COLUMNS}
      entry[f'{subset}_ci95'] = mean_ci([r[subset]['Total'] for r in runs])[1]
    entry['per_seed'] = {str(r['seed']): {s: r[s]['Total'] for s in SUBSETS} for r in runs}
    variants[name] = entry
  if 'single_frame' in variants:
    base = {int(s): v for s, v in variants['single_frame']['per_seed'].items()}
    for name, entry in variants.items():
      if name != 'single_frame':
        per_seed = {int(s): v for s, v in entry['per_seed'].items()}
        entry['vs_single_frame'] = {
            s: paired_difference(per_seed, base, s) for s in SUBSETS}
  return {'default_variant': default_variant, 'variants': variants}


def write_outputs(workdir, doc, command, wall_s, out_dir=None):
  """results.json, results.md and results.png under `workdir` (and copies in out_dir)."""
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(doc, f, indent=2)
  variants = doc['variants']
  lines = ['# Synthetic hard-frame study', '', f'Command: `{command}`', '',
           'PoseTrack mAP (%) on the synthetic val split, detector boxes; mean ± 95% '
           't-interval half-width over seeds (n seeds). Default variant: '
           f'`{doc["default_variant"]}`.', '']
  for subset in SUBSETS:
    lines += [f'## {subset.capitalize()} key frames', '',
              '| Variant | n | ' + ' | '.join(COLUMNS) + ' | Δ Total vs single_frame [95% CI] |',
              '|---|---|' + '---|' * (len(COLUMNS) + 1)]
    for name, e in variants.items():
      cells = [f'{e[subset][c]:.1f}' for c in COLUMNS[:-1]]
      cells.append(f'{e[subset]["Total"]:.1f} ± {e[f"{subset}_ci95"]:.1f}')
      d = e.get('vs_single_frame', {}).get(subset)
      diff = (f'{d["mean"]:+.1f} [{d["ci95"][0]:+.1f}, {d["ci95"][1]:+.1f}]' if d else '')
      lines.append(f'| {name} | {e["n"]} | ' + ' | '.join(cells) + f' | {diff} |')
    lines.append('')
  lines += ['## Per seed (Total)', '', '| Variant | seed | clean | degraded | status |',
            '|---|---|---|---|---|']
  for name, e in variants.items():
    for s, v in e['per_seed'].items():
      lines.append(f'| {name} | {s} | {v["clean"]:.1f} | {v["degraded"]:.1f} | '
                   f'{",".join(e["status"])} |')
  lines += ['', f'Wall time: {wall_s / 60:.1f} min.', '']
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines))
  _plot(doc, os.path.join(workdir, 'results.png'))
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    for name in ('results.json', 'results.md', 'results.png'):
      shutil.copy(os.path.join(workdir, name), os.path.join(out_dir, name))


def _plot(doc, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  variants = list(doc['variants'])
  x = np.arange(len(variants))
  fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
  for i, subset in enumerate(SUBSETS):
    m = [doc['variants'][v][subset]['Total'] for v in variants]
    s = [doc['variants'][v][f'{subset}_ci95'] for v in variants]
    ax.bar(x + (i - 0.5) * 0.38, m, 0.38, yerr=s, capsize=3, label=f'{subset} key frames')
  ax.set_xticks(x, variants, rotation=25, ha='right', fontsize=8)
  ax.set_ylabel('mAP Total (%)')
  ax.set_title('Synthetic val, detector boxes (mean, 95% t-interval over seeds)')
  ax.legend(loc='lower right')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def default_variant_name():
  """The first TDMI variant whose overrides leave configs/synthetic.py unchanged (the
  shipped default)."""
  base = synthetic_config.get_config()

  def value(dotted):
    node = base
    for part in dotted.split('.'):
      node = node[part]
    return node

  return next(n for n, (o, _) in VARIANTS.items()
              if o is not None and all(value(k) == v for k, v in o.items()))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--quick', action='store_true',
                      help='tiny dataset, two steps per model, one seed (smoke test)')
  parser.add_argument('--steps', type=int, default=None, help='training steps per model')
  parser.add_argument('--seeds', type=str, default=None, help='comma-separated seeds')
  parser.add_argument('--variants', type=str, default=','.join(VARIANTS))
  parser.add_argument('--cache', type=int, default=1,
                      help='1: cache the frozen backbone outputs (see the docstring)')
  parser.add_argument('--cache_examples', type=int, default=None)
  parser.add_argument('--out', default=None, help='also copy the results files here')
  parser.add_argument('--report_only', action='store_true',
                      help='train nothing: tabulate the finished runs under --workdir')
  args = parser.parse_args(argv)
  defaults = QUICK if args.quick else FULL
  args.steps = args.steps or defaults['steps']
  args.cache_examples = args.cache_examples or defaults['cache_examples']
  seeds = tuple(int(s) for s in args.seeds.split(',')) if args.seeds else defaults['seeds']
  variants = [v for v in args.variants.split(',') if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f'--variants: unknown {unknown}; known: {list(VARIANTS)}')
  workdir = os.path.abspath(args.workdir)
  data_root = os.path.join(workdir, 'data')
  runs_root = os.path.join(workdir, 'runs')
  os.makedirs(runs_root, exist_ok=True)
  # Reruns (and the three seeds of a variant) reuse compiled steps from disk.
  jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  command = 'python -m tdmi_jax.experiments.hard_frames ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  per_run, caches = [], {}
  # Seed-major: each seed's feature cache is built once and serves every variant.
  for seed in seeds:
    for variant in variants:
      # single_frame is deterministic: one evaluation stands for every seed.
      if VARIANTS[variant][0] is None and seed != seeds[0]:
        continue
      if args.report_only:
        path = _result_path(runs_root, variant, seed)
        per_run += [json.load(open(path))] if os.path.exists(path) else []
        continue
      per_run += run_variant(variant, (seed,), args, data_root, runs_root, caches)
      # Partial tables after every run: an interrupted study still shows its numbers.
      write_outputs(workdir, aggregate(per_run, default_variant_name()), command,
                    time.perf_counter() - start)
  wall = (sum(r.get('wall_s', 0.0) for r in per_run) if args.report_only
          else time.perf_counter() - start)
  doc = aggregate(per_run, default_variant_name())
  write_outputs(workdir, doc, command, wall, args.out)
  print(open(os.path.join(workdir, 'results.md')).read())
  return doc


if __name__ == '__main__':
  main()
