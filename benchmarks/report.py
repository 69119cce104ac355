"""The comparison table: rows built from pairs of case results (minilora, peft), the QLoRA issue's targets
checked against them, and the table rendered as text (terminal), Markdown (README) and JSON.

`python -m benchmarks.report [results/latest.json]` re-renders the Markdown from a saved JSON file.
Stdlib only, so the pytest process stays light.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SAME_WITHIN = 0.05  # ratios within 5% of 1 are reported as "same"
LOSS_TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2, "nf4": 2e-2}  # max relative loss difference called "same curve"
VERDICTS = {"s": ("faster", "slower"), "tok/s": ("slower", "faster"), "bytes": ("lighter", "heavier")}
# Table sections in the order (the tests run in file order; the table is sorted by this).
SECTIONS = {
    "train": "1. SmolLM2-135M training step (LoRA r=16 on 7 projections, batch 4 x 256)",
    "loss": "2. Loss curve: same init, data order, dropout 0 (SmolLM2-135M, 4 batches of 2 x 128 in a loop, "
            "lr 2e-4)",
    "tasks": "3. BERT-base / flan-t5-base shapes (random weights), LoRA r=16",
    "load": "4. Load the TinyLlama-1.1B-shaped sharded bf16 checkpoint (peft column: transformers)",
    "generation": "5. Greedy generation, SmolLM2-135M + LoRA (bf16, batch 1)",
    "import": "6. Import time",
    "interop": "7. Adapter interop",
    "fidelity": "8. Fidelity: loss decrease since step 0 over the fp32-compute reference's, same weights, init and "
                "batch (Llama-2-7B width, 2 layers, LoRA r=16 on 7 projections, dropout 0, AdamW lr 1e-4)",
}
FIDELITY_TOLERANCE = 0.10  # the loss decrease within 10% of the reference's at every step


@dataclass
class Row:
    section: str
    case: str
    metric: str
    unit: str  # "s", "tok/s", "bytes", "count", "abs" (absolute difference), "rel" (relative difference)
    minilora: float | str | None = None  # a number, or "missing" / "error" when that side did not run
    peft: float | str | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if isinstance(self.minilora, (int, float)) and isinstance(self.peft, (int, float)) and self.peft:
            return self.minilora / self.peft
        return None

    @property
    def verdict(self) -> str:
        ratio = self.ratio
        if ratio is None:
            return ""
        if self.unit == "count":
            return "same" if ratio == 1 else "differs"
        if self.unit not in VERDICTS or abs(ratio - 1) <= SAME_WITHIN:
            return "same" if self.unit in VERDICTS else ""
        low, high = VERDICTS[self.unit]
        return low if ratio < 1 else high


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured (a side missing or failed)


# --------------------------------------------------------------------------------------------------------
# Rows from case results


def _value(result: dict | None, key: str):
    """result[key], or the side's status ("missing", "error", "not run") when it produced no numbers."""
    if not result:
        return "not run"
    if result.get("status") != "ok":
        return result.get("status", "error")
    return result.get(key)


def _ok(*results: dict | None) -> bool:
    return all(r and r.get("status") == "ok" for r in results)


def _row(section: str, case: str, metric: str, unit: str, pair: dict, key: str) -> Row:
    return Row(section, case, metric, unit, _value(pair.get("minilora"), key), _value(pair.get("peft"), key))


def _mem_label(pair: dict) -> str:
    for result in pair.values():
        if _ok(result) and "memory_kind" in result:
            return result["memory_kind"]
    return "peak memory"


def train_rows(section: str, case: str, pair: dict) -> list[Row]:
    """Step time, tokens/s, training peak memory and trainable parameters of one training case."""
    m = pair.get("minilora")
    rows = [_row(section, case, "median step time", "s", pair, "step_s"),
            _row(section, case, "tokens/s", "tok/s", pair, "tokens_per_s"),
            _row(section, case, "CPU time per step (all threads)", "s", pair, "step_cpu_s"),
            _row(section, case, f"{_mem_label(pair)} (training)", "bytes", pair, "peak_mem"),
            _row(section, case, "trainable parameters", "count", pair, "trainable")]
    if _ok(m) and "mfu" in m:
        p = pair.get("peft")
        mfu = Row(section, case, "MFU: model FLOPs per step / step time / matmul rate", "%", m["mfu"],
                  _value(p, "mfu"))
        mfu.note = (f"{m['model_flops'] / 1e12:.2f} TFLOP per step"
                    + (f" + {m['recompute_flops'] / 1e12:.2f} recomputed" if m.get("recompute_flops") else "")
                    + f"; matmul rate {m['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, measured in the run")
        rows.append(mfu)
    if _ok(m) and m.get("rounds", 1) > 1:
        rows[0].note = (f"median of {m['timed_steps']} steps: {m['rounds']} runs per stack, alternated ABBA, "
                        f"{len(m['step_times_s']) - m['warmup']} steps each after {m['warmup']} warm-up")
    elif _ok(m):
        rows[0].note = f"median of {len(m['step_times_s']) - m['warmup']} steps after {m['warmup']} warm-up"
    return rows


def scale_rows(section: str, case: str, pair: dict) -> list[Row]:
    """A training case's rows plus the time and peak memory of its `quantize=` load."""
    return train_rows(section, case, pair) + [
        _row(section, case, "load with quantize: time", "s", pair, "load_s"),
        _row(section, case, f"load with quantize: {_mem_label(pair)}", "bytes", pair, "load_peak_mem")]


def merge_rounds(results: list[dict]) -> dict:
    """One result from several runs of the same case and stack. Training cases pool their timed steps (each
    run's warm-up dropped): step time and CPU time are medians over the pool, memory the highest peak."""
    if len(results) == 1 or not all(_ok(r) for r in results) or "step_times_s" not in results[0]:
        return next((r for r in results if not _ok(r)), results[0])
    timed = [t for r in results for t in r["step_times_s"][r["warmup"]:]]
    cpu = [t for r in results for t in r["step_cpu_times_s"][r["warmup"]:]]
    merged = dict(results[0])
    merged.update(step_s=statistics.median(timed), step_cpu_s=statistics.median(cpu),
                  tokens_per_s=results[0]["tokens_per_step"] / statistics.median(timed), timed_steps=len(timed),
                  rounds=len(results), step_s_per_round=[r["step_s"] for r in results],
                  peak_mem=max(r["peak_mem"] for r in results),
                  process_peak_rss=max(r["process_peak_rss"] for r in results))
    if "mfu" in merged:  # against the best matmul rate any of the runs measured
        merged["matmul_flops_per_s"] = max(r["matmul_flops_per_s"] for r in results)
        merged["mfu"] = merged["model_flops"] / merged["step_s"] / merged["matmul_flops_per_s"]
    return merged


def max_relative_loss_diff(pair: dict) -> float | None:
    m, p = pair.get("minilora"), pair.get("peft")
    if not _ok(m, p):
        return None
    return max(abs(a - b) / abs(b) for a, b in zip(m["losses"], p["losses"], strict=True))


def loss_rows(section: str, case: str, pair: dict) -> list[Row]:
    m, p = pair.get("minilora"), pair.get("peft")
    diff = max_relative_loss_diff(pair)
    if diff is None:
        status = _value(m, "") if not _ok(m) else _value(p, "")
        return [Row(section, case, "max relative loss difference", "rel", status, status)]
    curve = {side: f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}" for side, r in pair.items()}
    note = f"{len(m['losses'])} steps; loss {curve['minilora']} (minilora), {curve['peft']} (peft)"
    return [Row(section, case, "max relative loss difference", "rel", diff, note=note)]


def load_rows(section: str, case: str, pair: dict) -> list[Row]:
    m = pair.get("minilora")
    rows = [_row(section, case, "load time", "s", pair, "load_s"),
            Row(section, case, "load + first forward (8 tokens)", "s",
                *(_sum(pair.get(side), "load_s", "first_forward_s") for side in ("minilora", "peft"))),
            _row(section, case, f"{_mem_label(pair)}, load + first forward", "bytes", pair, "peak_mem"),
            _row(section, case, "peak RSS above the RSS before loading", "bytes", pair, "peak_over_before"),
            _row(section, case, "model bytes in memory", "bytes", pair, "model_bytes")]
    if _ok(m):
        size = fmt(m["checkpoint_bytes"], "bytes")
        rows[0].note = f"{m['n_files']} file(s), {size} on disk, read from the page cache"
    return rows


def _sum(result: dict | None, *keys: str):
    return sum(result[k] for k in keys) if _ok(result) else _value(result, keys[0])


def generation_rows(section: str, case: str, pair: dict) -> list[Row]:
    m, p = pair.get("minilora"), pair.get("peft")
    rows = [_row(section, case, "tokens/s, adapter unmerged", "tok/s", pair, "unmerged_tokens_per_s"),
            _row(section, case, "tokens/s, adapter merged", "tok/s", pair, "merged_tokens_per_s")]
    if _ok(m, p):
        same = "yes" if m["unmerged_tokens"] == p["unmerged_tokens"] else "no"
        rows[0].note = f"{m['new_tokens']} greedy tokens; same tokens as peft: {same}"
    return rows


def import_rows(section: str, pair: dict) -> list[Row]:
    m = pair.get("minilora")
    case = "`import minilora` vs `import peft, transformers`"
    rows = [_row(section, case, "import time (median)", "s", pair, "import_s"),
            _row(section, case, "fresh interpreter, total", "s", pair, "process_s")]
    if _ok(m):
        pulled = [name for name in ("transformers", "peft") if m[f"pulls_{name}"]]
        rows[0].note = (f"`import torch` alone: {m['import_torch_s']:.2f} s; `import minilora` imports "
                        f"{' and '.join(pulled) if pulled else 'neither transformers nor peft'}")
    return rows


def interop_rows(section: str, result: dict | None) -> list[Row]:
    case = "LoRA r=16, 7 projections, SmolLM2-135M"
    if not _ok(result):
        status = _value(result, "")
        return [Row(section, case, "adapter_model.safetensors size", "bytes", status, status)]
    m, p = result["minilora"], result["peft"]
    note = (f"base models differ by {result['base_max_abs_diff']:.2e}; the adapter moves logits by up to "
            f"{result['adapter_effect_max_abs']:.2f}")
    return [
        Row(section, case, "adapter_model.safetensors size", "bytes", m["adapter_bytes"], p["adapter_bytes"]),
        Row(section, case, "adapter_config.json size", "bytes", m["config_bytes"], p["config_bytes"]),
        Row(section, case, "max |logit diff| loading the other stack's adapter", "abs",
            m["loads_other_max_abs_diff"], p["loads_other_max_abs_diff"], note=note),
    ]


def fidelity_ratios(pairs: dict[str, dict]) -> dict[str, list[float]]:
    """{stack: [(loss_0 - loss_k) / (ref_0 - ref_k) for k = 1, 2, ...]} for every stack that ran (as many
    steps as both ran)."""
    ref = pairs.get("reference")
    if not _ok(ref):
        return {}
    base = [ref["losses"][0] - x for x in ref["losses"][1:]]
    return {stack: [(r["losses"][0] - x) / b for x, b in zip(r["losses"][1:], base, strict=False)]
            for stack, r in pairs.items() if stack != "reference" and _ok(r)}


def fidelity_worst(ratios: list[float]) -> float:
    return max(abs(x - 1) for x in ratios)


def fidelity_rows(section: str, case: str, pairs: dict[str, dict]) -> list[Row]:
    ratios = fidelity_ratios(pairs)
    if "minilora" not in ratios:
        status = _value(pairs.get("reference"), "") if not _ok(pairs.get("reference")) else "error"
        return [Row(section, case, "loss decrease / reference's", "x", status, status)]
    ref, n = pairs["reference"]["losses"], len(ratios["minilora"])
    extra = ratios.get("minilora+autocast")
    rows = []
    peft = ratios.get("peft", [])
    for k in sorted({1, 2, 3, 4, 8, 12, 16, n} & set(range(1, n + 1))):
        note = f"reference: {ref[0] - ref[k]:.4f}"
        if extra and k <= len(extra):
            note += f"; minilora under bf16 autocast {extra[k - 1]:.3f}"
        rows.append(Row(section, case, f"after {k} step{'s' if k > 1 else ''}", "x", ratios["minilora"][k - 1],
                        peft[k - 1] if k <= len(peft) else _value(pairs.get("peft"), "") if not peft else "not run",
                        note))
    worst = {stack: fidelity_worst(r) for stack, r in ratios.items()}
    rows.append(Row(section, case, f"worst |ratio - 1| over {n} steps", "x", worst["minilora"],
                    worst.get("peft", _value(pairs.get("peft"), "")),
                    f"minilora under bf16 autocast {worst['minilora+autocast']:.3f}" if extra else ""))
    return rows


# --------------------------------------------------------------------------------------------------------
# The QLoRA issue's targets


def _pairs(raw: dict[str, dict], key: str) -> tuple[dict | None, dict | None]:
    pairs = raw.get(key, {}).get("pairs") or {}
    return pairs.get("minilora"), pairs.get("peft")


def targets(raw: dict[str, dict]) -> list[Target]:
    """Check the QLoRA issue's speed / memory / loading targets against the results of this run."""
    out = []
    for gc in (False, True):
        # bf16 products, or (CPUs without fast bf16 kernels) the run with fp32 products in both stacks
        precision = next((x for x in ("nf4", "nf4-fp32") if _ok(*_pairs(raw, f"train:{x}:gc={gc}"))), "nf4")
        m, p = _pairs(raw, f"train:{precision}:gc={gc}")
        where = f"{'with' if gc else 'without'} gradient checkpointing{', fp32 products' * (precision != 'nf4')}"
        speed_name, memory_name = f"QLoRA step tokens/s, {where}", f"QLoRA step peak memory, {where}"
        if not _ok(m, p):
            out += [Target(speed_name, ">= 2x peft", "not measured", None),
                    Target(memory_name, "<= peft", "not measured", None)]
            continue
        speed, mem = m["tokens_per_s"] / p["tokens_per_s"], m["peak_mem"] / p["peak_mem"]
        memory = f"{fmt(m['peak_mem'], 'bytes')} vs {fmt(p['peak_mem'], 'bytes')} ({mem:.2f}x)"
        out += [Target(speed_name, ">= 2x peft", f"{speed:.2f}x peft", speed >= 2),
                Target(memory_name, "<= peft", memory, mem <= 1)]
    m, p = _pairs(raw, "loss:nf4")
    diff = max_relative_loss_diff({"minilora": m, "peft": p})
    out.append(Target("QLoRA loss curve (same init, data, dropout 0)",
                      f"same as peft: max relative difference <= {LOSS_TOLERANCE['nf4']:g}",
                      f"{diff:.2e}" if diff is not None else "not measured",
                      diff <= LOSS_TOLERANCE["nf4"] if diff is not None else None))
    m, p = _pairs(raw, "load:nf4")
    goal = "<= 1.25x the NF4 model's bytes"
    if _ok(m) and m.get("peak_over_before") is not None:
        ratio = m["peak_over_before"] / m["model_bytes"]
        measured = (f"{ratio:.2f}x: {fmt(m['peak_over_before'], 'bytes')} above the RSS before loading, "
                    f"model {fmt(m['model_bytes'], 'bytes')} (total peak RSS {fmt(m['peak_mem'], 'bytes')})")
        out.append(Target("NF4 load peak RSS", goal, measured, ratio <= 1.25))
    else:
        out.append(Target("NF4 load peak RSS", goal, "not measured", None))
    out.append(Target("NF4 load time", "below transformers'",
                      f"{m['load_s']:.1f} s vs {p['load_s']:.1f} s" if _ok(m, p) else "not measured",
                      m["load_s"] < p["load_s"] if _ok(m, p) else None))
    ratios = fidelity_ratios(raw.get("fidelity:qlora", {}).get("pairs") or {})
    goal = f"loss decrease within {FIDELITY_TOLERANCE:.0%} of the fp32 reference's at every step, closer than peft"
    if "minilora" in ratios and "peft" in ratios:
        m, p = fidelity_worst(ratios["minilora"]), fidelity_worst(ratios["peft"])
        out.append(Target("QLoRA fidelity", goal, f"worst {m:.3f} vs peft's {p:.3f}",
                          m <= FIDELITY_TOLERANCE and m < p))
    elif "fidelity:qlora" in raw:
        out.append(Target("QLoRA fidelity", goal, "not measured", None))
    m, _ = _pairs(raw, "load:prequantized")
    if _ok(m):
        out.append(Target("pre-quantized NF4 folder load", "< 2 s", f"{m['load_s']:.2f} s", m["load_s"] < 2))
    else:
        out.append(Target("pre-quantized NF4 folder load", "< 2 s", "not measured", None))
    return out


# --------------------------------------------------------------------------------------------------------
# Rendering


def fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if unit == "bytes":
        for size, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")):
            if abs(value) >= size or size == 1:
                scaled = value / size
                return f"{scaled:.{2 if abs(scaled) < 10 else 1 if abs(scaled) < 100 else 0}f} {suffix}"
    if unit == "count":
        return f"{value:,}"
    if unit == "s":
        return f"{value:.3f} s" if value < 1 else f"{value:.2f} s"
    if unit == "%":
        return f"{value:.1%}"
    if unit == "x":
        return f"{value:.3f}"
    if unit == "tok/s":
        return f"{value:,.1f} tok/s"
    return f"{value:.2e}"


def _cells(row: Row) -> list[str]:
    ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
    return [row.case, row.metric, fmt(row.minilora, row.unit), fmt(row.peft, row.unit), ratio, row.verdict,
            row.note]


HEADER = ["case", "metric", "minilora", "peft", "minilora/peft", "minilora is", "note"]


def ordered(rows: list[Row]) -> list[Row]:
    """Rows grouped by section in SECTIONS order (stable within a section)."""
    rank = {title: i for i, title in enumerate(SECTIONS.values())}
    return sorted(rows, key=lambda r: rank.get(r.section, len(rank)))


def render_text(rows: list[Row], target_list: list[Target], machine: dict) -> str:
    rows = ordered(rows)
    lines = [f"minilora vs peft + transformers + bitsandbytes: {machine_summary(machine)}; "
             f"{run_summary(machine)}"]
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(HEADER) - 1)]
    section = None
    for row, cells in zip([None, *rows], table, strict=True):
        if row is not None and row.section != section:
            section = row.section
            lines.append(f"-- {section} " + "-" * max(0, sum(widths) + 12 - len(section)))
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + "  " + cells[-1])
    lines.append("-- Targets (QLoRA issue) " + "-" * 40)
    for t in target_list:
        status = {True: "MET", False: "MISSED", None: "n/a"}[t.met]
        lines.append(f"  {status:<6}  {t.name}: {t.measured} (goal {t.goal})")
    return "\n".join(lines)


def render_markdown(rows: list[Row], target_list: list[Target], machine: dict, command: str) -> str:
    out = [f"Measured with `{command}` on {machine_summary(machine)}, {machine.get('date', '')}; "
           f"{run_summary(machine)}.", ""]
    out += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    section = None
    for row in ordered(rows):
        if row.section != section:
            section = row.section
            out.append(f"| **{section}** |" + " |" * (len(HEADER) - 1))
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |")
    out += ["", "| target (QLoRA issue) | goal | measured | |", "|---|---|---|---|"]
    for t in target_list:
        status = {True: "met", False: "**missed**", None: "n/a"}[t.met]
        out.append(f"| {t.name} | {t.goal} | {t.measured} | {status} |")
    return "\n".join(out) + "\n"


def run_summary(machine: dict) -> str:
    """How long the run took and how busy the machine was (the 1-minute load average vs the core count)."""
    loads = [machine.get(k) for k in ("load_average_start", "load_average_end")]
    parts = [f"{machine['duration_s'] / 60:.0f} min"] if machine.get("duration_s") is not None else []
    if None not in loads:
        parts.append(f"load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end")
    return ", ".join(parts) or "no run data"


def machine_info() -> dict:
    """Where and with what the benchmarks ran (stdlib only: nothing heavy is imported here)."""
    first_cpu: dict[str, str] = {}  # the first processor's fields of /proc/cpuinfo
    try:
        for key, _, value in (line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines()):
            first_cpu.setdefault(key.strip(), value.strip())
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pytest-benchmark"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS_DIR.parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cpu, flags = first_cpu.get("model name") or platform.processor(), set(first_cpu.get("flags", "").split())
    # The CPU's bf16 matrix instructions decide which precision recipe is fast (README, "Benchmarks").
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else \
        "no native bf16 matrix instructions" if flags else "unknown bf16 support"
    return {"cpu": cpu, "cpu_bf16": bf16, "cores": os.cpu_count(), "ram_gb": round(mem_kb / 1e6, 1),
            "threads": int(os.environ.get("MINILORA_BENCH_THREADS", "2")),
            "python": platform.python_version(),
            "os": platform.platform(), "versions": versions, "minilora_commit": commit,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def machine_summary(machine: dict) -> str:
    v = machine.get("versions", {})
    bf16 = f" ({machine['cpu_bf16']})" if machine.get("cpu_bf16") else ""
    return (f"{machine.get('cpu')}{bf16}, {machine.get('cores')} cores ({machine.get('threads')} torch threads), "
            f"{machine.get('ram_gb')} GB RAM; torch {v.get('torch')}, transformers {v.get('transformers')}, "
            f"peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}")


def write(rows: list[Row], target_list: list[Target], machine: dict, raw: dict, command: str,
          name: str) -> Path:
    """Write results/<name>.json (everything, raw results included) and results/<name>.md; returns the .md."""
    RESULTS_DIR.mkdir(exist_ok=True)
    data = {"command": command, "machine": machine, "rows": [asdict(r) for r in rows],
            "targets": [asdict(t) for t in target_list], "raw": raw}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(render_markdown(rows, target_list, machine, command))
    return path


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else RESULTS_DIR / "latest.json"
    data = json.loads(path.read_text())
    rows = [Row(**r) for r in data["rows"]]
    target_list = [Target(**t) for t in data["targets"]]
    print(render_markdown(rows, target_list, data["machine"], data["command"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
