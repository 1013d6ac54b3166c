"""Weights shipped inside the repository (`tdmi_jax/weights/`), checked by sha256 on load.

`config.init_from='shipped:NAME'` loads one of `SHIPPED`. The synthetic-pretrained
backbone plays, for the synthetic dataset, the role the COCO-pretrained HRNet-W48 plays on
PoseTrack. Regenerate it (README, "Shipped backbone"):

  python launch.py --config=configs/synthetic_backbone.py --workdir=runs/synthetic_backbone
  python -m tdmi_jax.shipped --export runs/synthetic_backbone --name synthetic_small

The second command writes the backbone of the workdir's latest checkpoint to
`tdmi_jax/weights/<name>.msgpack` and prints its sha256 (to put in `SHIPPED`).
"""

import argparse
import hashlib
import pathlib

import flax.serialization
import jax
import numpy as np

PREFIX = 'shipped:'
WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / 'weights'
SHIPPED = {
    'synthetic_small': dict(
        file='synthetic_small.msgpack', variant='small',
        sha256='17d832d7e465eb4ad976e2f86f54171cb43ff7428e012e4de20554afe57120bb'),
}


class WeightsError(ValueError):
  """A shipped weights file is missing, altered or unreadable."""


def path(name):
  if name not in SHIPPED:
    raise WeightsError(f'config.init_from={PREFIX}{name}: no shipped weights of that name; '
                       f'known: {sorted(SHIPPED)}')
  return WEIGHTS_DIR / SHIPPED[name]['file']


def sha256(file):
  return hashlib.sha256(pathlib.Path(file).read_bytes()).hexdigest()


def load(name):
  """{'params', 'batch_stats'} numpy trees of shipped weights `name`, hash-checked."""
  file = path(name)
  if not file.is_file():
    raise WeightsError(f'{file}: shipped weights {name!r} are missing (a partial checkout?)')
  data = file.read_bytes()
  got = hashlib.sha256(data).hexdigest()
  if got != SHIPPED[name]['sha256']:
    raise WeightsError(f'{file}: sha256 {got} does not match the recorded '
                       f'{SHIPPED[name]["sha256"]}: the file is corrupt or was replaced')
  try:
    tree = flax.serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f'{file}: not a readable msgpack weights file: {e}') from e
  return {'params': tree['params'], 'batch_stats': tree.get('batch_stats') or {}}


def export(workdir, name):
  """Writes the backbone of `workdir`'s latest checkpoint to WEIGHTS_DIR; returns (path, sha)."""
  from tdmi_jax import checkpointing  # pylint: disable=g-import-not-at-top
  raw = checkpointing.load_pretrained(workdir)
  tree = {'params': raw['params'].get('backbone', raw['params']),
          'batch_stats': (raw['batch_stats'] or {}).get('backbone', raw['batch_stats'])}
  tree = jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
  out = WEIGHTS_DIR / f'{name}.msgpack'
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(flax.serialization.msgpack_serialize(tree))
  return out, sha256(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description='Export shipped backbone weights.')
  parser.add_argument('--export', required=True, metavar='WORKDIR',
                      help='training workdir whose latest checkpoint holds the backbone')
  parser.add_argument('--name', required=True)
  args = parser.parse_args(argv)
  out, digest = export(args.export, args.name)
  print(f'{out}: sha256 {digest} ({out.stat().st_size} bytes)')


if __name__ == '__main__':
  main()
