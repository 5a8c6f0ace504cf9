"""Turn a `pytest bench/ --benchmark-only --benchmark-json=run.json` run into a Markdown table (each case
against the transformers case of its group) and a PNG chart of the speed-ups.

    python bench/report.py run.json --png bench/speedup.png >> bench/RESULTS.md
    python bench/report.py sizes.json --sizes-png bench/sizes.png   # bench_sizes.py's tokens/s by model size
"""
import argparse
import json


def _baseline(cases: list[dict]) -> dict | None:
    return next((c for c in cases if c["extra_info"].get("side") == "transformers"
                 or c["name"].startswith("test_transformers")), None)


def rows(benchmarks: list[dict]) -> list[dict]:
    """One row per benchmark: group, name, mean seconds, speed-up over its group's transformers case, info."""
    groups = {}
    for bench in benchmarks:
        groups.setdefault(bench["group"], []).append(bench)
    out = []
    for group, cases in groups.items():
        base = _baseline(cases)
        for case in cases:
            mean = case["stats"]["mean"]
            speedup = base["stats"]["mean"] / mean if base else None
            out.append(dict(group=group, name=case["name"], mean=mean, speedup=speedup, info=case["extra_info"]))
    return out


def _info(info: dict) -> str:
    keep = {k: v for k, v in info.items() if k not in ("mode", "side", "acceptance_by_depth")}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items())


def markdown(table: list[dict]) -> str:
    lines = ["| group | case | mean s | speed-up vs transformers | notes |", "|---|---|---|---|---|"]
    for r in table:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {r['group']} | {r['name']} | {r['mean']:.4f} | {speedup} | {_info(r['info'])} |")
    return "\n".join(lines)


def chart(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in table if r["speedup"]]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(shown) + 1))
    ax.barh([f"{r['group']}: {r['name']}" for r in shown], [r["speedup"] for r in shown], color="tab:green")
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("speed-up over transformers (same group)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def sizes_chart(benchmarks: list[dict], path: str) -> None:
    """Tokens/s against the target's parameters, one line per side, from `bench_sizes.py`'s cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float]]] = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        if bench["group"].startswith("sizes "):
            lines.setdefault(info["side"], []).append((info["parameters"], info["tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, points in lines.items():
        ax.plot(*zip(*sorted(points)), marker="o", label=side)
    ax.set(xscale="log", yscale="log", xlabel="target parameters", ylabel="greedy tokens / s",
           title="2 CPU threads, 96 new tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="pytest-benchmark JSON")
    parser.add_argument("--png", help="write the speed-up chart here")
    parser.add_argument("--sizes-png", help="write the chart of tokens/s against model size here")
    args = parser.parse_args()
    with open(args.run) as f:
        benchmarks = json.load(f)["benchmarks"]
    table = rows(benchmarks)
    print(markdown(table))
    if args.png:
        chart(table, args.png)
    if args.sizes_png:
        sizes_chart(benchmarks, args.sizes_png)


if __name__ == "__main__":
    main()
