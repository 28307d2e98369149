"""Minimal reproduction: grain's ConcatThenSplitIterDataset resumes one document late from a
JSON-saved state when a packed row ended exactly at a document's end.

  python benchmarks/repro/grain_packing_state_json.py

Pure grain, no project code. Documents of 4 tokens packed into rows of 8: every row ends at a
document's end, so the packer holds the next document whole as its remainder and saves it as
remainder_slices {'tokens': (-1, -1)}, its sentinel for "the whole element". A checkpoint
writes the state as JSON (grain.checkpoint, orbax), which gives the tuple back as the list
[-1, -1]; set_state compares that list unequal to the tuple sentinel, takes the document for
the slice [-1:-1] (empty) and drops it. Restoring the state object itself (no JSON) is right.
The suite wraps the packer so that restore turns the slices back into tuples
(`data_pipelines.pipeline.RestorablePacking`).

Seen with grain 0.2.18 (2026-12). Prints, for each way of restoring, the first row after the
restore and whether it equals the uninterrupted run's.
"""

import json

import grain


def main():
  docs = [{'tokens': [10 * d + i for i in range(4)]} for d in range(12)]

  def rows():
    parent = grain.MapDataset.source(docs).to_iter_dataset()
    return iter(grain.experimental.ConcatThenSplitIterDataset(parent, length_struct={'tokens': 8}))

  it = rows()
  next(it)
  state = it.get_state()
  want = next(it)['tokens'].tolist()
  print('state after one row:', state)
  for how, saved in (('state object', state), ('JSON round trip', json.loads(json.dumps(state)))):
    resumed = rows()
    resumed.set_state(saved)
    got = next(resumed)['tokens'].tolist()
    print(f'{how:16s} next row {got} ({"OK" if got == want else f"WRONG, expected {want}"})')


if __name__ == '__main__':
  main()
