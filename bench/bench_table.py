"""Markdown tables from the benchmark's JSON-lines records (no torch needed)."""
from __future__ import annotations

import json
import math
from pathlib import Path

# Issue #6: diffusers 0.42.1 WanTransformer3DModel, Ulysses CP + cuDNN SDPA, nvidia-h200-x4, s/forward.
ANCHORS = {
    ("14b", 1280, 720, 81): {1: 11.84, 2: 6.31, 4: 3.22},
    ("1.3b", 832, 480, 81): {1: 0.620, 2: 0.359, 4: 0.178},
}
# Targets for ours: seconds per forward on 4 GPUs, and speed-up 1 -> 4 GPUs.
TARGETS = {("14b", 1280, 720, 81): 2.5, ("1.3b", 832, 480, 81): 0.14}
TARGET_SCALING_1_TO_4 = 3.85


def read_jsonl(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            records.append(json.loads(line))
    return records


def levers(r: dict) -> str:
    """What was switched on besides the defaults (rows with different levers are not compared)."""
    parts = []
    if r.get("ours_attn_requested") not in (None, "cudnn", "cpu"):
        parts.append(f"ours-attn={r['ours_attn_requested']}")
    if r.get("ulysses_requested") is not None:
        parts.append(f"ulysses={r['ulysses_requested']}")
    if r.get("compile_requested", r.get("compile")):  # older records have only "compile"
        parts.append("compile")
    if r.get("anchor_eager"):
        parts.append("diffusers-eager")
    if (r.get("head_chunks") or 1) > 1:
        parts.append(f"chunks{r['head_chunks']}")
    if r.get("ours_fp8_requested"):
        parts.append("ours-fp8")
    if r.get("fsdp"):
        parts.append("fsdp")
    if r.get("mem_fraction"):
        parts.append(f"mem{r['mem_fraction']:g}")
    if r.get("layers") is not None and r.get("model") in ("14b", "1.3b"):
        full = {"14b": 40, "1.3b": 30}[r["model"]]
        if r["layers"] != full:
            parts.append(f"{r['layers']}layers")
    if r.get("tag"):
        parts.append(str(r["tag"]))
    return "+".join(parts) or "-"


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def collect(records: list[dict]) -> dict:
    """{(model, w, h, frames, levers): {gpus: {impl: record}}}; later records of the same cell win."""
    rows: dict = {}
    for r in records:
        if r.get("kind") != "case" or r.get("status") != "ok":
            continue
        key = (r["model"], r["width"], r["height"], r["frames"], levers(r))
        rows.setdefault(key, {}).setdefault(r["gpus"], {})[r["impl"]] = r
    return rows


def format_table(records: list[dict]) -> str:
    rows = collect(records)
    lines = [
        "| model | size | frames | tokens | levers | GPUs | ours s | diffusers s | diffusers/ours | ours x vs 1 GPU "
        "| diffusers x vs 1 GPU | ours peak GiB | diffusers peak GiB | ours attn | issue #6 anchor s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    target_lines = []
    for key in sorted(rows, key=lambda k: (k[0], k[1] * k[2], k[3], k[4])):
        model, width, height, frames, lever = key
        by_gpus = rows[key]
        base = by_gpus.get(1, {})
        for gpus in sorted(by_gpus):
            cell = by_gpus[gpus]
            ours, theirs = cell.get("ours"), cell.get("diffusers")
            o = ours["median_s"] if ours else None
            d = theirs["median_s"] if theirs else None
            ratio = d / o if o and d else None
            o_scale = base["ours"]["median_s"] / o if o and "ours" in base else None
            d_scale = base["diffusers"]["median_s"] / d if d and "diffusers" in base else None
            tokens = (ours or theirs)["tokens"]
            anchor = ANCHORS.get((model, width, height, frames), {}).get(gpus)
            lines.append(
                f"| {model} | {width}x{height} | {frames} | {tokens} | {lever} | {gpus} | {_fmt(o)} | {_fmt(d)} "
                f"| {_fmt(ratio, '.2f')} | {_fmt(o_scale, '.2f')} | {_fmt(d_scale, '.2f')} "
                f"| {_fmt(ours and ours.get('peak_gib'), '.1f')} | {_fmt(theirs and theirs.get('peak_gib'), '.1f')} "
                f"| {ours.get('attn') if ours else '-'} | {_fmt(anchor, '.3f')} |"
            )
        target = TARGETS.get((model, width, height, frames))
        four = by_gpus.get(4, {}).get("ours")
        if target and four:
            verdict = "met" if four["median_s"] <= target else "NOT met"
            target_lines.append(f"- {model} {width}x{height}x{frames} ({lever}), ours on 4 GPUs: "
                                f"{four['median_s']:.3f} s vs target <= {target} s: {verdict}")
        if four and "ours" in base:
            scaling = base["ours"]["median_s"] / four["median_s"]
            verdict = "met" if scaling >= TARGET_SCALING_1_TO_4 else "NOT met"
            target_lines.append(f"- {model} {width}x{height}x{frames} ({lever}), ours scaling 1 -> 4 GPUs: "
                                f"{scaling:.2f}x vs target >= {TARGET_SCALING_1_TO_4}x: {verdict}")
    out = ["## Seconds per transformer forward (median; step time = slowest rank)", "", *lines]
    if target_lines:
        out += ["", "## Targets", "", *target_lines]
    checks = [r for r in records if r.get("kind") == "check"]
    if checks:
        out += ["", "## Ours vs diffusers on the same random weights (bf16)", "",
                "| model | size | frames | GPUs | status | rel err | max abs err | ref rms | finite |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in checks:
            out.append(f"| {r['model']} | {r['width']}x{r['height']} | {r['frames']} | {r['gpus']} | {r['status']} "
                       f"| {_fmt(r.get('rel_err'), '.2e')} | {_fmt(r.get('max_abs_err'), '.2e')} "
                       f"| {_fmt(r.get('ref_rms'), '.2e')} | {r.get('finite', '-')} |")
    problems = [r for r in records if r.get("status") == "error" and r.get("kind") != "check"
                or r.get("kind") in ("world_error", "skip")]
    problems += [r for r in checks if r.get("status") == "error"]
    if problems:
        out += ["", "## Errors and skips", ""]
        for r in problems:
            what = " ".join(str(r[k]) for k in ("kind", "impl", "model", "gpus") if r.get(k) is not None)
            size = f" {r['width']}x{r['height']}x{r['frames']}" if "width" in r else ""
            rank = f" rank {r['rank']}" if "rank" in r else ""
            out.append(f"- {what}{size}{rank}: {r.get('error') or r.get('reason')}")
    return "\n".join(out)
