r"""Do the supporting frames carry the key frame's pose? Fixed mixtures of the backbone's heatmaps.

Command (from the repository root; ~3 minutes on the 2-core CPU):

  python -m tdmi_jax.experiments.window_oracle --workdir runs/window_oracle

Before asking a learned temporal model to beat one frame, this checks that the synthetic
data makes it possible: the shipped single-frame backbone is run on every frame of each val
box's window t-2..t+2 (the key frame's crop, so a moving person drifts a little in the
neighbours), and its heatmaps are combined by fixed rules with nothing trained:

  key        the key frame alone (the single-frame baseline)
  mean5      the mean over the five frames
  neighbours the mean of t-1 and t+1 (the key frame left out)
  key_half   half the key frame, a quarter each of t-1 and t+1
  max5       the per-pixel maximum over the five frames

If a rule that ignores the key frame beats the key frame on degraded key frames, the
neighbours hold the pose the degraded frame lost, and a temporal model has something to
learn; how much it gains is bounded below by these rules only if it can represent them
(configs/synthetic.py's `model.residual_base='window'` can). Writes <workdir>/oracle.json
({rule: {"all", "clean", "degraded"} mAP Totals}) and each rule's predictions and
eval_results under <workdir>/<rule>/.
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import synthetic as synthetic_config
from tdmi_jax import checkpointing
from tdmi_jax.data import input_pipeline
from tdmi_jax.evaluation import map_eval
from tdmi_jax.models import tdmi

KEY = tdmi.NUM_FRAMES // 2
RULES = {
    'key': lambda h: h[:, KEY],
    'mean5': lambda h: h.mean(axis=1),
    'neighbours': lambda h: 0.5 * (h[:, KEY - 1] + h[:, KEY + 1]),
    'key_half': lambda h: 0.5 * h[:, KEY] + 0.25 * (h[:, KEY - 1] + h[:, KEY + 1]),
    'max5': lambda h: h.max(axis=1),
}


def window_heatmaps_fn(config):
  """`batch -> [B, 5, h, w, K]`: the config's pretrained backbone on each window frame."""
  model = tdmi.build_model(config.model)
  raw = checkpointing.load_pretrained(config.init_from)
  variables = {'params': {'backbone': raw['params']},
               'batch_stats': {'backbone': raw.get('batch_stats') or {}}}
  apply = jax.jit(lambda x: tdmi.backbone_apply(model, variables, x)[0])

  def fn(batch):
    frames = np.asarray(batch['frames'])
    b, t = frames.shape[:2]
    heatmaps = np.asarray(apply(jnp.asarray(frames.reshape(b * t, *frames.shape[2:]))))
    return heatmaps.reshape(b, t, *heatmaps.shape[1:])

  return fn


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--config_arg', default=None,
                      help="argument of configs/synthetic.py's get_config (e.g. 'runlocal')")
  parser.add_argument('--seed', type=int, default=None, help='generator seed of the dataset')
  parser.add_argument('--rules', default=','.join(RULES))
  args = parser.parse_args(argv)
  rules = [r for r in args.rules.split(',') if r]
  unknown = sorted(set(rules) - set(RULES))
  if unknown:
    parser.error(f'--rules: unknown {unknown}; known: {list(RULES)}')
  config = synthetic_config.get_config(args.config_arg).unlock()
  workdir = os.path.abspath(args.workdir)
  config.data.manual_dir = os.path.join(workdir, 'data', 'synthetic')
  config.data.data_dir = os.path.join(workdir, 'data', 'tfds')
  if args.seed is not None:
    config.synthetic.seed = args.seed
  if not config.init_from:  # runlocal trains from scratch; the rules need a trained backbone.
    config.init_from = 'shipped:synthetic_small'
    config.model.variant = 'small'
    config.data.image_size, config.data.heatmap_size = (128, 96), (32, 24)
  config.eval.num_overlays = 0
  input_pipeline.prepare_data(config, os.path.join(workdir, 'data'))
  windows = window_heatmaps_fn(config)
  out = {}
  for rule in rules:
    metrics = map_eval.map_evaluation(config, os.path.join(workdir, rule), 0,
                                      lambda b, f=RULES[rule]: f(windows(b)),
                                      title=f'Rule {rule!r}')
    out[rule] = {s: metrics.get(k) for s, k in (('all', 'map/Total'),
                                                 ('clean', 'map_clean/Total'),
                                                 ('degraded', 'map_degraded/Total'))}
  with open(os.path.join(workdir, 'oracle.json'), 'w') as f:
    json.dump(out, f, indent=2)
  print('| rule | all | clean | degraded |\n|---|---|---|---|')
  for rule, row in out.items():
    print(f'| {rule} | ' + ' | '.join('-' if row[s] is None else f'{row[s]:.1f}'
                                      for s in ('all', 'clean', 'degraded')) + ' |')
  return out


if __name__ == '__main__':
  main()
