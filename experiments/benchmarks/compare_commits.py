"""Training-step time of the attention model at two (or more) commits, side by side in one process.

On a shared machine, timings taken in separate processes drift by up to ±15 % (slow periods of the
host); a change worth a few percent is only visible when both versions run in the same process,
their steps interleaved. This script extracts ``attnconv/`` at each commit (``git archive``) into
a temporary folder as a package of another name (``attnconv_<i>``, imports rewritten), builds the
same model from each, compiles each step, then times the steps round-robin::

    python -m experiments.benchmarks.compare_commits --commits=HEAD~1,HEAD --encoding=quadratic \\
        --batch=25 --repeats=7

A commit of ``.`` is the working tree. Prints, per commit, the median step time, images/s, the
ratio to the first commit and the first losses (equal losses at step 1 mean the forward passes
agree), and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def extract_package(commit: str, name: str, dest: str) -> str:
  """``attnconv/`` at ``commit`` (``.`` = working tree) as package ``name`` under ``dest``."""
  target = os.path.join(dest, name)
  if commit == ".":
    shutil.copytree(
      os.path.join(ROOT, "attnconv"), target, ignore=shutil.ignore_patterns("__pycache__")
    )
  else:
    blob = subprocess.run(
      ["git", "-C", ROOT, "archive", commit, "attnconv"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
      safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
      tar.extractall(dest, **safe)
    os.rename(os.path.join(dest, "attnconv"), target)
  for folder, _, files in os.walk(target):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        with open(path) as fh:
          text = fh.read()
        with open(path, "w") as fh:
          fh.write(re.sub(r"\battnconv(?=[. ])", name, text))
  return target


def make_step(package: str, encoding: str, batch: int, dtype: str, model_kwargs: dict):
  """A compiled SGD step of ``package``'s attention network and its initial state."""
  import jax
  import jax.numpy as jnp
  import optax

  build_model = importlib.import_module(package + ".models").build_model
  kw = {"encoding": encoding, "dtype": jnp.dtype(dtype), **model_kwargs}
  if encoding in ("quadratic", "generalized"):
    kw.setdefault("shared_dropout_mask", True)
  model = build_model("attention_net", num_classes=10, **kw)
  x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
  y = jnp.zeros((batch,), jnp.int32)
  params = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x[:1])["params"]
  tx = optax.sgd(0.1, momentum=0.9)

  def step(p, o, rng):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, True, rngs={"dropout": rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  opt = tx.init(params)
  compiled = jax.jit(step).lower(params, opt, jax.random.key(3)).compile()
  return compiled, params, opt


def compare(
  commits: list[str],
  encoding: str = "quadratic",
  batch: int = 25,
  dtype: str = "bfloat16",
  repeats: int = 7,
  warmup: int = 2,
  model_kwargs: dict | None = None,
) -> list[dict]:
  """Median step time per commit, the steps of all commits interleaved."""
  import jax

  tmp = tempfile.mkdtemp(prefix="compare_commits_")
  sys.path.insert(0, tmp)
  try:
    states = []
    for i, commit in enumerate(commits):
      name = f"attnconv_{i}"
      extract_package(commit, name, tmp)
      states.append(list(make_step(name, encoding, batch, dtype, model_kwargs or {})))
    times = [[] for _ in commits]
    losses = [[] for _ in commits]
    rng = jax.random.key(3)
    for r in range(warmup + repeats):
      for i, state in enumerate(states):
        start = time.perf_counter()
        params, opt, loss = state[0](state[1], state[2], rng)
        loss.block_until_ready()
        if r >= warmup:
          times[i].append(time.perf_counter() - start)
        losses[i].append(float(loss))
        state[1], state[2] = params, opt
  finally:
    sys.path.remove(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
  base = statistics.median(times[0])
  rows = []
  for commit, ts, ls in zip(commits, times, losses):
    median = statistics.median(ts)
    rows.append(
      {
        "commit": commit,
        "step_s": median,
        "images_per_second": batch / median,
        "speedup_vs_first": base / median,
        "step_s_all": ts,
        "losses": ls[:3],
      }
    )
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--commits", default="HEAD~1,HEAD", help="comma-separated; '.' = working tree"
  )
  parser.add_argument("--encoding", default="quadratic")
  parser.add_argument("--batch", type=int, default=25)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = compare(args.commits.split(","), args.encoding, args.batch, args.dtype, args.repeats)
  for r in rows:
    print(
      f"{r['commit']:>12s}  step {r['step_s'] * 1e3:8.1f} ms  {r['images_per_second']:6.2f} img/s"
      f"  x{r['speedup_vs_first']:.3f}  losses {r['losses']}"
    )
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
