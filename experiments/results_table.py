"""Collects ``summary.json`` of finished runs into a Markdown table and a JSON file.

Usage::

  python -m experiments.results_table runs/cpu/quadratic runs/cpu/learned --out runs/cpu/table.json

(``experiments/cpu_results.sh`` runs it on its runs.)
"""

from __future__ import annotations

import argparse
import json
import pathlib


def collect(workdirs: list[str]) -> list[dict]:
  rows = []
  for wd in workdirs:
    path = pathlib.Path(wd)
    summary = json.loads((path / "summary.json").read_text())
    config = json.loads((path / "config.json").read_text())
    model = dict(config["model"])
    rows.append(
      {
        "workdir": str(path),
        "model": model.pop("name"),
        "encoding": model.get("encoding", ""),
        "params": summary["num_params"],
        "test_accuracy": summary["final_test_accuracy"],
        "best_val_accuracy": summary["best_val_accuracy"],
        "epochs": round(summary["epochs"], 2),
        "train_seconds": round(summary["train_seconds"], 1),
        "images_per_second": round(summary["images_per_second"], 1),
        "device": ",".join(summary["devices"]["kinds"])
        if isinstance(summary["devices"], dict)
        else str(summary["devices"]),
        "optimizer": config.get("optimizer", "sgd"),
      }
    )
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--out", default="runs/results_table.json")
  args = p.parse_args(argv)
  rows = collect(args.workdirs)
  cols = [
    "model",
    "encoding",
    "params",
    "test_accuracy",
    "best_val_accuracy",
    "epochs",
    "train_seconds",
    "images_per_second",
    "device",
    "optimizer",
  ]
  print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
  for r in rows:
    print("| " + " | ".join(str(r[c]) for c in cols) + " |")
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
