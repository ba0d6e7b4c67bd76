"""The JSON-lines files of a trainer workdir (``metrics.jsonl``, ``centers.jsonl``): one JSON
object per line, read by the trainer on resume and by the studies and plots that analyse runs."""

from __future__ import annotations

import json
import os
import pathlib


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The objects of a JSON-lines file, in file order; blank lines are skipped and a missing
  file has none.

  Raises:
    ValueError: naming the file and line of a line that is not a JSON object.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(
        f"path: expected a JSON object on line {number} of {path}: {error}"
      ) from None
    if not isinstance(row, dict):
      raise ValueError(
        f"path: expected a JSON object on line {number} of {path}, got {type(row).__name__}"
      )
    rows.append(row)
  return rows
