"""Every claim of ``proofs/`` as a pytest test, plus ``python -m proofs`` end to end."""

import os
import subprocess
import sys

import pytest

from proofs import all_claims, run_claim

CLAIMS = all_claims()


@pytest.mark.parametrize("c", CLAIMS, ids=[c.name for c in CLAIMS])
def test_claim(c):
  result = run_claim(c)
  assert result.passed, result.detail


def test_enough_claims_and_methods():
  assert len(CLAIMS) >= 12
  methods = {c.method for c in CLAIMS}
  assert {"symbolic", "SMT", "exact arithmetic"} <= methods
  assert len({c.name for c in CLAIMS}) == len(CLAIMS)


def test_cli_list_and_filter(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-m", "proofs", "--list"], cwd=root, capture_output=True, text=True
  )
  assert out.returncode == 0 and "lemma1.conv3d" in out.stdout
  report = tmp_path / "report.json"
  out = subprocess.run(
    [sys.executable, "-m", "proofs", "lemma2.", "--json", str(report)],
    cwd=root,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  assert "PASS" in out.stdout and report.exists()
  out = subprocess.run(
    [sys.executable, "-m", "proofs", "no-such-claim"], cwd=root, capture_output=True, text=True
  )
  assert out.returncode == 2


@pytest.mark.slow
def test_cli_runs_all_claims():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "proofs"], cwd=root, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
