"""Host time of a training step in two source trees, from alternating fresh processes.

On a shared VM the one-process medians of ``bench_host`` drift by more than the differences in
question (the same step measured 90 and 152 ms forty minutes apart), so a host-time ratio
between two commits comes from this A/B instead: per round, per spec and per tree, one fresh
process (``PYTHONPATH`` = the tree, one thread) builds the model, runs 2 warm-up steps, times
``--steps`` steps with ``time.thread_time()`` (the process's CPU time) and reports the fastest
and the median. The summary gives, per spec, each tree's median and fastest over the rounds and
the ratio of the last tree to the first.

    python -m benchmarks.host_ab BASE_TREE NEW_TREE [--specs narrow:ms-cuda,narrow:official] [--rounds 4]

A spec is ``WIDTH:VARIANT``: width ``narrow`` (``bench_host --narrow``) or ``full``, a variant
of ``bench_host.VARIANTS``. Every tree needs this repository's ``benchmarks/bench_host.py`` and
``benchmarks/host_ab.py`` (copy them into an older checkout) and its extension built in place.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import environment, write_json


def time_steps(spec: str, preset: str, steps: int) -> tuple[float, float]:
    """(fastest, median) ms of CPU time per training step of ``spec`` in this process."""
    import torch  # noqa: PLC0415 (the child's imports come from its tree)

    from benchmarks import bench_host  # noqa: PLC0415

    torch.set_num_threads(1)
    width, variant = spec.split(":")
    model, hr, lr = bench_host.build(
        bench_host.narrow(preset) if width == "narrow" else preset, variant, torch.device("cpu"), 16, 1
    )
    params = list(model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        model.nll(hr, lr).mean().backward()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.thread_time()
        step()
        times.append((time.thread_time() - t0) * 1e3)
    return min(times), statistics.median(times)


def run_child(tree: Path, spec: str, args: argparse.Namespace) -> tuple[float, float]:
    """:func:`time_steps` in a fresh process on ``tree``'s sources."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.host_ab",
        "--child",
        spec,
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
    ]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{tree} {spec} failed:\n{out.stderr[-2000:]}")
    fastest, median = map(float, out.stdout.split()[-2:])
    return fastest, median


def describe(tree: Path) -> dict:
    """The tree's path and commit (with ``+`` when its tracked files differ from it)."""
    git = ["git", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"], capture_output=True).returncode != 0
    return {"path": str(tree), "commit": commit + ("+" if dirty else "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, help="source trees, the base first")
    parser.add_argument("--specs", default="narrow:ms-cuda,narrow:official")
    parser.add_argument("--preset", default="df2k-4x")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default: print only)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(*(f"{t:.2f}" for t in time_steps(args.child, args.preset, args.steps)))
        return
    if len(args.trees) < 2:
        parser.error("give at least two trees, the base first")
    trees = [t.resolve() for t in args.trees]
    specs = args.specs.split(",")
    fastest: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for spec in specs:
            for k, tree in enumerate(trees):
                best, median = run_child(tree, spec, args)
                fastest.setdefault((spec, k), []).append(best)
                print(f"round {r}: {spec} {tree}: fastest {best:.1f} ms, median {median:.1f} ms", flush=True)
    summary = []
    for spec in specs:
        per_tree = [fastest[(spec, k)] for k in range(len(trees))]
        row = {
            "spec": spec,
            "per_round_fastest_ms": per_tree,
            "ratio_of_medians": statistics.median(per_tree[-1]) / statistics.median(per_tree[0]),
            "ratio_of_fastest": min(per_tree[-1]) / min(per_tree[0]),
        }
        summary.append(row)
        print(f"{spec}: last/first {row['ratio_of_medians']:.2f} (medians), {row['ratio_of_fastest']:.2f} (fastest)")
    if args.out:
        import torch  # noqa: PLC0415

        payload = {"env": environment(torch.device("cpu")), "preset": args.preset, "rounds": args.rounds}
        payload.update(steps=args.steps, command=" ".join(sys.argv), trees=[describe(t) for t in trees])
        payload["results"] = summary  # per_round_fastest_ms: one list per tree, in ``trees`` order
        print(f"wrote {write_json(f'host_ab_{args.preset}', payload, args.out)}")


if __name__ == "__main__":
    main()
