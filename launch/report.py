r"""Plots and a summary table of runs: `python -m launch.report RUN_DIR [RUN_DIR ...] --out=DIR`.

Writes `loss_vs_step.png`, `loss_vs_tokens.png`, `learning_rate.png`, `tokens_per_sec.png`,
`mfu.png` (one curve per run, with a legend), `probe_accuracy.png` (runs with a linear probe)
and `data_mixture.png` (runs on a data mixture), and `summary.md` into --out, and prints the
table.
`--names=a,b` labels the runs (default: their directory names).

Exit codes: 0 done, 2 bad input (a directory without metrics.jsonl, an unknown flag).
"""

from absl import app
from absl import flags

from launch.cli import fail, parse_flags

_OUT = flags.DEFINE_string('out', 'report', 'Directory for the PNG files and summary.md.')
_NAMES = flags.DEFINE_list('names', None, 'Labels of the runs, in order.')


def main(argv):
  run_dirs = argv[1:]
  if not run_dirs:
    fail('give one or more run directories: python -m launch.report runs/a runs/b --out=DIR.')
  if _NAMES.value and len(_NAMES.value) != len(run_dirs):
    fail(f'--names has {len(_NAMES.value)} labels for {len(run_dirs)} runs.')
  from pretrain import guards  # pylint: disable=g-import-not-at-top
  from pretrain import report  # pylint: disable=g-import-not-at-top

  try:
    guards.check_dir_can_be_written(_OUT.value, '--out')
  except ValueError as e:
    fail(str(e))
  try:
    written = report.write_report(run_dirs, _OUT.value, _NAMES.value)
  except report.ReportError as e:
    fail(str(e))
  with open(written[-1], encoding='utf-8') as f:
    print(f.read())
  print('wrote ' + ', '.join(written))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
