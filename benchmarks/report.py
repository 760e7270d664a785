"""Turn a folder of benchmark JSON files into a Markdown report and matplotlib plots.

Reads whichever of bench_actnorm_conv.json, bench_affine_coupling.json (plus the torch.compile
rows in compiled/ of the same names), bench_stack.json, bench_memory.json,
bench_srflow_<preset>.json and pytest_benchmark_cpu_kernels.json are present and writes report.md plus
memory_vs_batch.png, samples_vs_batch.png and memory_vs_depth.png next to them. Every table
states the device, versions and date the JSON recorded.

    python -m benchmarks.report benchmarks/results/<device>-<date>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _env_line(env: dict) -> str:
    device = env.get("gpu") or env.get("cpu") or env.get("device")
    return (
        f"{device}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}; "
        f"commit {env.get('commit')}; {env.get('date')}"
    )


def _table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def op_section(data: dict, title: str) -> str:
    keys = [k for k in data["rows"][0] if k not in {"op", "provider", "mode"} and not k.startswith(("ms", "gbps"))]
    keys = [k for k in keys if k not in {"frac_copy_bw", "peak_gib", "error", "skipped"}]
    rows = []
    for r in data["rows"]:
        if "ms" not in r:
            continue
        case = " ".join(f"{k}={r[k]}" for k in keys if k in r)
        frac = r.get("frac_copy_bw")
        rows.append([case, r["provider"], r["mode"], r["ms"], r.get("gbps"), None if frac is None else 100 * frac])
    copy = data.get("copy_gbps")
    head = f"### {title}\n\n{_env_line(data['env'])}. Copy bandwidth measured in the same run: {copy:.0f} GB/s.\n\n"
    return head + _table(["case", "provider", "mode", "median ms", "GB/s", "% of copy"], rows)


def stack_section(data: dict) -> str:
    rows = [[r["layout"], r["provider"], r["mode"], r["ms"], r.get("peak_gib")] for r in data["rows"] if "ms" in r]
    head = f"### 16-step stack (B16, C12, 80x80, cond 320)\n\n{_env_line(data['env'])}.\n\n"
    return head + _table(["layout", "provider", "mode", "median ms", "peak GiB"], rows)


def srflow_section(data: dict) -> str:
    rows = []
    for res in data["results"]:
        for p in res.get("points", []):
            if "ms" in p:
                rows.append([res["variant"], p["batch"], p["ms"], p["samples_per_s"], p.get("peak_gib")])
        if "at_official_b16_memory" in res:
            p = res["at_official_b16_memory"]
            rows.append(
                [
                    res["variant"] + " (at official b16 memory)",
                    p["batch"],
                    p["ms"],
                    p["samples_per_s"],
                    p.get("peak_gib"),
                ]
            )
    size = data["hr_size"]
    text = f"### SRFlow {data['preset']} training, {size}x{size} HR\n\n{_env_line(data['env'])}.\n\n"
    text += _table(["variant", "batch", "step ms", "samples/s", "peak GiB"], rows)
    fits = [
        [r["variant"], r["fit"]["gib_per_sample"], *r["fit"]["largest_batch_predicted"].values()]
        for r in data["results"]
        if r.get("fit")
    ]
    if fits:
        budgets = list(next(r["fit"] for r in data["results"] if r.get("fit"))["largest_batch_predicted"])
        text += "\n\nLinear fit of peak memory over the measured batches:\n\n"
        text += _table(["variant", "GiB per sample", *(f"largest batch in {b}" for b in budgets)], fits)
    samples = [
        [r["variant"], r["sampling"]["batch"], r["sampling"]["ms"]] for r in data["results"] if r.get("sampling")
    ]
    if samples:
        text += "\n\nSampling (temperature 0.9):\n\n" + _table(["variant", "batch", "median ms"], samples)
    return text


def cpu_kernels_section(data: dict) -> str:
    """pytest-benchmark JSON of bench_cpu_kernels.py: C++ vs reference median per group."""
    groups: dict[str, dict[str, float]] = {}
    for bench in data["benchmarks"]:
        impl = bench["params"]["impl"]
        groups.setdefault(bench["group"], {})[impl] = bench["stats"]["median"] * 1e6
    rows = [
        [g, t.get("cpp"), t.get("reference"), t["reference"] / t["cpp"] if len(t) == 2 else None]
        for g, t in sorted(groups.items())
    ]
    info = data["machine_info"]
    threads = data["benchmarks"][0]["extra_info"].get("threads")
    head = (
        f"### C++ CPU kernels vs the eager reference\n\n{info.get('cpu', {}).get('brand_raw', info.get('machine'))}, "
        f"{threads} threads, {data['datetime']}, `pytest benchmarks/bench_cpu_kernels.py --benchmark-only`.\n\n"
    )
    return head + _table(["op direction shape", "C++ median us", "reference median us", "speed-up"], rows)


def memory_section(data: dict) -> str:
    rows = [[r["axis"], r["depth"], r["size"], r["variant"], r.get("gib"), r.get("error")] for r in data["rows"]]
    head = f"### FlowSequence memory vs depth and size ({data['measure']})\n\n{_env_line(data['env'])}.\n\n"
    return head + _table(["axis", "depth", "size", "variant", "GiB", "error"], rows)


def plots(folder: Path, srflow: list[dict], memory: dict | None) -> list[str]:
    made = []
    for data in srflow:
        for key, ylabel, name in (
            ("peak_gib", "peak memory (GiB)", "memory_vs_batch.png"),
            ("samples_per_s", "samples/s", "samples_vs_batch.png"),
        ):
            curves = [(res["variant"], [p for p in res.get("points", []) if key in p]) for res in data["results"]]
            curves = [(v, pts) for v, pts in curves if pts]
            if not curves:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for variant, pts in curves:
                ax.plot([p["batch"] for p in pts], [p[key] for p in pts], marker="o", label=variant)
            ax.set_xlabel("batch")
            ax.set_ylabel(ylabel)
            ax.set_title(f"SRFlow {data['preset']} training")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(folder / name, dpi=120)
            plt.close(fig)
            made.append(name)
    if memory:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in ("plain", "checkpoint", "memory_saving"):
            pts = [r for r in memory["rows"] if r["axis"] == "depth" and r["variant"] == variant and "gib" in r]
            ax.plot([r["depth"] for r in pts], [r["gib"] for r in pts], marker="o", label=variant)
        ax.set_xlabel("steps")
        ax.set_ylabel("GiB")
        ax.set_title(memory["measure"])
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "memory_vs_depth.png", dpi=120)
        plt.close(fig)
        made.append("memory_vs_depth.png")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    folder = args.folder

    def load(name: str) -> dict | None:
        path = folder / name
        return json.loads(path.read_text()) if path.exists() else None

    sections = []
    for name, title in (
        ("bench_actnorm_conv.json", "ActNorm + 1x1 conv"),
        ("bench_affine_coupling.json", "Affine coupling / injector"),
    ):
        data = load(name)
        compiled = load(f"compiled/{name}")  # scripts/gpu_check.sh runs torch.compile separately
        if data and compiled:
            data["rows"] += compiled["rows"]
        if data:
            sections.append(op_section(data, title))
    stack = load("bench_stack.json")
    if stack:
        sections.append(stack_section(stack))
    cpu_kernels = load("pytest_benchmark_cpu_kernels.json")
    if cpu_kernels:
        sections.append(cpu_kernels_section(cpu_kernels))
    srflow = [json.loads(p.read_text()) for p in sorted(folder.glob("bench_srflow_*.json"))]
    sections += [srflow_section(d) for d in srflow]
    memory = load("bench_memory.json")
    if memory:
        sections.append(memory_section(memory))
    made = plots(folder, srflow, memory)
    body = "# Benchmark report\n\n" + "\n\n".join(sections) + "\n"
    body += "".join(f"\n![{m}]({m})\n" for m in made)
    (folder / "report.md").write_text(body)
    print(f"wrote {folder / 'report.md'} and {', '.join(made) or 'no plots'}")


if __name__ == "__main__":
    main()
