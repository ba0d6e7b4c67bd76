"""``python -m proofs [--list] [--json PATH] [FILTER ...]``: run the claims and print a report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> int:
  """Runs the selected claims; returns 0 when all pass, 1 otherwise (2 if none selected)."""
  parser = argparse.ArgumentParser(prog="python -m proofs", description=__doc__)
  parser.add_argument("filters", nargs="*", help="run only claims whose name contains one of these")
  parser.add_argument("--list", action="store_true", help="list the claims and exit")
  parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
  parser.add_argument("-v", "--verbose", action="store_true", help="print details of every claim")
  args = parser.parse_args(argv)

  from proofs._registry import all_claims, run_claim

  claims = [c for c in all_claims() if not args.filters or any(f in c.name for f in args.filters)]
  if not claims:
    print(f"no claim matches {args.filters}", file=sys.stderr)
    return 2
  width = max(len(c.name) for c in claims)
  if args.list:
    for c in claims:
      print(f"{c.name:<{width}}  {c.method:<16}  {c.statement}")
    return 0

  t0 = time.perf_counter()
  results = []
  for c in claims:
    r = run_claim(c)
    results.append(r)
    status = "PASS" if r.passed else "FAIL"
    print(f"{r.name:<{width}}  {r.method:<16}  {status}  {r.seconds:7.2f}s", flush=True)
    if r.detail and (args.verbose or not r.passed):
      for line in r.detail.rstrip().splitlines():
        print(f"    {line}")
  total = time.perf_counter() - t0
  failed = [r for r in results if not r.passed]
  print(f"{len(results) - len(failed)}/{len(results)} claims passed in {total:.1f}s")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(
        {
          "total_seconds": total,
          "passed": not failed,
          "claims": [
            {**dataclasses.asdict(r), "statement": c.statement} for r, c in zip(results, claims)
          ],
        },
        fh,
        indent=2,
      )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
