"""Every `docs/...` citation in the repository points at a section that exists, and nothing
cites notes that a clone does not have."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ('algorithms', 'design', 'dependencies', 'huggingface', 'finetuning')
# `docs/algorithms.md 6.2`, docs/design.md 4, `docs/algorithms.md` 1.2-1.3 (first number).
CITATION = re.compile(r'docs/(\w+)\.md`?\s*(\d+(?:\.\d+)?)?')


def _tracked_text_files():
  try:
    names = subprocess.run(
      ['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
  except (OSError, subprocess.CalledProcessError):
    names = [str(p.relative_to(ROOT)) for p in ROOT.rglob('*') if p.is_file()]
  files = [
    ROOT / n for n in names if n.endswith(('.py', '.md', '.cfg', '.toml')) or n in ('Makefile',)
  ]
  return [f for f in files if f.exists() and '.venv' not in f.parts]


def _sections(doc: str) -> set[str]:
  text = (ROOT / 'docs' / f'{doc}.md').read_text(encoding='utf-8')
  return set(re.findall(r'^#{2,3} (\d+(?:\.\d+)?)\.? ', text, flags=re.M))


def test_every_docs_citation_resolves():
  sections = {p.stem: _sections(p.stem) for p in (ROOT / 'docs').glob('*.md')}
  assert all(sections[doc] for doc in DOCS), sections  # the numbered notes the code cites
  bad, count = [], 0
  for path in _tracked_text_files():
    text = path.read_text(encoding='utf-8', errors='replace')
    for match in CITATION.finditer(text):
      doc, number = match.groups()
      count += 1
      where = f'{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}'
      if doc not in sections:
        bad.append(f'{where}: docs/{doc}.md does not exist')
      elif number and number not in sections[doc]:
        bad.append(f'{where}: docs/{doc}.md has no section {number}')
  assert count > 50  # the code does cite the docs
  assert not bad, '\n'.join(bad)


@pytest.mark.parametrize(
  'pattern', [r'\bSPEC(\.md)? ?\d', r'\bSPEC\.md', r'\bDESIGN\.md', r'\bSTACK\.md']
)
def test_no_citation_of_notes_outside_the_repository(pattern):
  hits = [
    f'{p.relative_to(ROOT)}'
    for p in _tracked_text_files()
    if p.name != 'test_docs.py' and re.search(pattern, p.read_text(errors='replace'))
  ]
  assert not hits, hits
