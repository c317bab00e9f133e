"""Cost-vs-work table and plot from the benchmark's JSON lines (``bench_forward.py --sweep``).

    python bench/plot_sweep.py bench_sweep.jsonl [more.jsonl ...] --out sweep   # -> sweep.md, sweep.png

Seconds per step (one transformer forward) for every frames x resolution x GPUs cell, and the
parallel efficiency ``t(1 GPU) / (N * t(N GPUs))``. The PNG needs matplotlib; without it only the
table is written (say so, no silent skip).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_table import levers, read_jsonl  # noqa: E402


def sweep_cells(records: list[dict], impl: str) -> dict:
    """{(model, levers): {(tokens, w, h, frames): {gpus: seconds}}} from the ok case records of ``impl``."""
    cells: dict = {}
    for r in records:
        if r.get("kind") != "case" or r.get("status") != "ok" or r.get("impl") != impl:
            continue
        series = cells.setdefault((r["model"], levers(r)), {})
        series.setdefault((r["tokens"], r["width"], r["height"], r["frames"]), {})[r["gpus"]] = r["median_s"]
    return cells


def sweep_table(cells: dict, impl: str) -> str:
    out = []
    for (model, lever), series in sorted(cells.items()):
        gpus = sorted({g for by_gpus in series.values() for g in by_gpus})
        out += [f"## {impl}, model {model}, levers {lever}: seconds per step (parallel efficiency vs 1 GPU)", "",
                "| size | frames | tokens | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus) + " |",
                "|---|---|---|" + "---|" * len(gpus)]
        for (tokens, width, height, frames) in sorted(series, key=lambda k: (k[1] * k[2], k[3])):
            by_gpus = series[(tokens, width, height, frames)]
            base = by_gpus.get(1)
            row = []
            for g in gpus:
                t = by_gpus.get(g)
                if t is None:
                    row.append("-")
                elif base is not None and g > 1:
                    row.append(f"{t:.3f} ({base / (g * t):.0%})")
                else:
                    row.append(f"{t:.3f}")
            out.append(f"| {width}x{height} | {frames} | {tokens} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out) if out else f"no successful '{impl}' case records found"


def sweep_plot(cells: dict, impl: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_eff) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (model, lever), series in sorted(cells.items()):
        gpus = sorted({g for by_gpus in series.values() for g in by_gpus})
        sizes = sorted({(k[1], k[2]) for k in series}, key=lambda wh: wh[0] * wh[1])
        # One line per (resolution, GPU count) over frame counts: colour = GPUs, line style = resolution.
        for s_index, (width, height) in enumerate(sizes):
            keys = sorted(k for k in series if (k[1], k[2]) == (width, height))  # by tokens
            for g_index, g in enumerate(gpus):
                label = f"{model} {lever} {width}x{height} {g} GPU{'s' if g > 1 else ''}".replace(" - ", " ")
                style = dict(marker="o", ls=styles[s_index % len(styles)], color=colors[g_index % len(colors)])
                points = [(k[0], series[k][g]) for k in keys if g in series[k]]
                if points:
                    ax_time.plot(*zip(*points), label=label, **style)
                eff = [(k[0], series[k][1] / (g * series[k][g])) for k in keys if g in series[k] and 1 in series[k]]
                if eff and g > 1:
                    ax_eff.plot(*zip(*eff), label=label, **style)
    ax_time.set(xscale="log", yscale="log", xlabel="tokens per forward", ylabel="seconds per step",
                title=f"{impl}: seconds per step")
    ax_eff.set(xscale="log", xlabel="tokens per forward", ylabel="t(1) / (N t(N))", title="parallel efficiency")
    ax_eff.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in (ax_time, ax_eff):
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="cost-vs-work table (markdown) and plot (PNG) from bench JSON lines")
    p.add_argument("jsonl", nargs="+", help="bench_sweep.jsonl (or bench.jsonl) files")
    p.add_argument("--impl", default="ours", help="which implementation's cases (ours or diffusers)")
    p.add_argument("--out", default="sweep", help="output path stem: STEM.md and STEM.png")
    args = p.parse_args(argv)
    records = [r for path in args.jsonl for r in read_jsonl(path)]
    cells = sweep_cells(records, args.impl)
    table = sweep_table(cells, args.impl)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(table + "\n")
    print(table)
    if importlib.util.find_spec("matplotlib") is None:
        print(f"matplotlib is not installed: wrote {stem.with_suffix('.md')} only, no plot "
              "(pip install matplotlib, or plot elsewhere from the JSON lines)")
        return
    if cells:
        sweep_plot(cells, args.impl, stem.with_suffix(".png"))
        print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
