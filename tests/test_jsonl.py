"""JSON-lines reader of trainer workdirs (experiments/jsonl.py)."""

from __future__ import annotations

import pytest

from experiments.jsonl import read_jsonl


def test_reads_objects_in_order_and_skips_blank_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "a": 0.5}\n\n  \n{"step": 2}\n')
  assert read_jsonl(path) == [{"step": 1, "a": 0.5}, {"step": 2}]
  assert read_jsonl(str(path)) == read_jsonl(path)


def test_missing_file_has_no_rows(tmp_path):
  assert read_jsonl(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize(
  "line, what", [("{not json", "Expecting property name"), ("[1, 2]", "got list")]
)
def test_bad_line_names_file_and_line(tmp_path, line, what):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n' + line + "\n")
  with pytest.raises(ValueError, match=f"^path: expected a JSON object on line 2 of .*{what}"):
    read_jsonl(path)
