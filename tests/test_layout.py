"""The package layout's promises: one direction of imports, safe names, working aliases."""

import ast
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imported_modules(path):
  """Every module `path` imports, `from a import b` counted as both a and a.b."""
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module
      yield from (f'{node.module}.{a.name}' for a in node.names)


def _library_files():
  # An experiment may read the config it runs and call the driver.
  return [p for p in sorted((ROOT / 'tdmi_jax').rglob('*.py')) if 'experiments' not in p.parts]


def test_library_never_imports_configs_or_the_datasets_folder():
  offenders = []
  for path in _library_files():
    for name in _imported_modules(path):
      if name.split('.')[0] in ('configs', 'datasets'):
        offenders.append(f'{path.relative_to(ROOT)}: {name}')
  assert not offenders


def test_the_driver_is_imported_by_no_library_module():
  users = [str(p.relative_to(ROOT)) for p in _library_files()
           if 'tdmi_jax.train' in set(_imported_modules(p))]
  assert users == []


def test_datasets_folder_does_not_shadow_an_installed_datasets_package(tmp_path):
  # A stand-in for Hugging Face's `datasets`, installed after the repo on the path: the
  # repo's datasets/ folder (no __init__.py) must not win, even with the repo root first.
  site = tmp_path / 'site'
  (site / 'datasets').mkdir(parents=True)
  (site / 'datasets' / '__init__.py').write_text('HF = True\n')
  code = ('import datasets, tdmi_jax.data.input_pipeline, tdmi_jax.data.records;'
          'print(datasets.HF)')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env={'PYTHONPATH': f'{ROOT}:{site}', 'PATH': '/usr/bin:/bin'},
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == 'True'
  assert not (ROOT / 'datasets' / '__init__.py').exists()
  assert 'datasets' not in (ROOT / 'pyproject.toml').read_text().split('include')[1]


def test_tfds_command_line_finds_the_builder_in_the_datasets_folder():
  # What `tfds build datasets/posetrack` does: import posetrack.posetrack_dataset_builder with
  # datasets/ on the path and take the one builder class defined there.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tdmi_jax.data import records  # pylint: disable=g-import-not-at-top
  with tfds.core.utils.add_sys_path(ROOT / 'datasets'):
    cls = tfds.core.community.builder_cls_from_module('posetrack.posetrack_dataset_builder')
  assert cls.name == records.Builder.name == 'posetrack'
  assert issubclass(cls, records.Builder)
  assert [c.name for c in cls.BUILDER_CONFIGS] == [
      'posetrack2017', 'posetrack2018', 'posetrack21', 'synthetic']


def test_old_module_names_are_the_moved_modules():
  # pylint: disable=g-import-not-at-top
  from tdmi_jax import batch_eval
  from tdmi_jax import evaluate
  from tdmi_jax import infer
  from tdmi_jax.evaluation import batch_eval as new_batch_eval
  from tdmi_jax.evaluation import evaluate as new_evaluate
  from tdmi_jax.inference import infer as new_infer
  # pylint: enable=g-import-not-at-top
  assert evaluate is new_evaluate and batch_eval is new_batch_eval and infer is new_infer


def test_python_m_aliases_run_the_moved_command_lines():
  from tdmi_jax.evaluation import batch_eval  # pylint: disable=g-import-not-at-top
  from tdmi_jax.inference import infer  # pylint: disable=g-import-not-at-top
  cases = (('tdmi_jax.evaluate', '--gt_dir', 'poseval'),
           ('tdmi_jax.batch_eval', '--workdir', batch_eval.__doc__.split('\n')[0]),
           ('tdmi_jax.infer', '--checkpoint', infer.__doc__.split('\n')[0]))
  for module, flag, doc in cases:
    proc = subprocess.run([sys.executable, '-m', module, '--help'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    # absl ends --help with status 1, argparse with 0; both print the moved module's help.
    assert proc.returncode in (0, 1) and flag in proc.stdout and doc in proc.stdout, (
        module, proc.stdout[-2000:], proc.stderr[-2000:])


def _project_documents():
  """The repository's own Markdown files, never those of a virtualenv or run folder in it."""
  try:
    listed = subprocess.run(['git', 'ls-files', '-z', '--', '*.md'], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split('\0')
    docs = [ROOT / name for name in listed if name]
  except (OSError, subprocess.CalledProcessError):  # an export without .git
    docs = [p for p in ROOT.rglob('*.md')
            if not any(part.startswith('.') or part in ('runs', 'site-packages')
                       for part in p.relative_to(ROOT).parts)]
  return sorted(p for p in docs if p.exists())


def test_documents_link_only_inside_the_repository():
  problems = []
  docs = _project_documents()
  assert ROOT / 'README.md' in docs and ROOT / 'docs' / 'design.md' in docs
  for doc in docs:
    text = doc.read_text()
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
      path = target.split('#')[0]
      if not path or re.match(r'[a-z]+://', path):
        continue
      resolved = (doc.parent / path).resolve()
      if ROOT not in (resolved, *resolved.parents) or not resolved.exists():
        problems.append(f'{doc.relative_to(ROOT)}: {target}')
    # The specification and layout notes the project started from live outside the repo.
    outside = re.findall(r'\S*(?:SPEC|LAYOUT)\.md', text)
    problems += [f'{doc.relative_to(ROOT)}: {m}' for m in outside]
  assert not problems


def test_missing_real_fixtures_skip_on_a_fresh_clone_and_fail_under_ci(tmp_path):
  def run(ci):
    env = {k: v for k, v in os.environ.items() if k != 'CI'}
    env.update(TDMI_FIXTURES_DIR=str(tmp_path / 'absent'), PYTHONPATH=str(ROOT))
    if ci:
      env['CI'] = 'true'
    return subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider',
         'tests/test_writer.py::test_gt_written_as_predictions_scores_100_on_real_fixtures'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  fresh, ci = run(False), run(True)
  assert fresh.returncode == 0, fresh.stdout[-2000:]
  assert 'SKIPPED [1]' in fresh.stdout and 'real PoseTrack fixtures not found' in fresh.stdout
  assert ci.returncode != 0, ci.stdout[-2000:]
  assert 'ERROR' in ci.stdout and 'CI=true: real PoseTrack fixtures not found' in ci.stdout
