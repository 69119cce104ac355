"""Fidelity: the same NF4 weights, LoRA init and batch trained by an fp32-compute reference, minilora's
defaults (also under bf16 autocast) and peft + `prepare_model_for_kbit_training`; the loss decrease since
step 0 of each, over the reference's, at every step. Plain LoRA on the bf16 weights the same way. Writes
benchmarks/results/fidelity-<mode>.png.

    pytest benchmarks --benchmark -k fidelity       # 20 steps of 2 x 128 per stack on a 2-layer hidden-4096 model

`python -m benchmarks.cases fidelity '{"stack": "minilora+autocast"}'` runs minilora under bf16 autocast too.
"""
from __future__ import annotations

import pytest

from benchmarks import report
from benchmarks.cases import WIDE

LABELS = {"qlora": "QLoRA NF4", "lora-bf16": "LoRA on bf16 weights"}
STACKS = ("reference", "minilora", "peft")


@pytest.mark.parametrize("mode", ["qlora", pytest.param("lora-bf16", marks=pytest.mark.full_only)])
def test_fidelity(compare, bench, mode):
    bench.prepare(WIDE)
    params = {"mode": mode, "steps": 8 if bench.quick else 20, "batch_size": 2, "seq_len": 64 if bench.quick else 128}
    pairs = compare(f"fidelity:{mode}", "fidelity", params,
                    lambda p: report.fidelity_rows(report.SECTIONS["fidelity"], LABELS[mode], p),
                    stacks=STACKS)
    plot(mode, pairs)
    ratios = report.fidelity_ratios(pairs)
    assert ratios, "the reference did not run"
    if mode == "qlora":
        assert report.fidelity_worst(ratios["minilora"]) <= report.FIDELITY_TOLERANCE, ratios["minilora"]


def plot(mode: str, pairs: dict[str, dict]) -> None:
    """Loss decrease since step 0 of every stack, and its ratio to the reference's, per step, into
    results/fidelity-<mode>.png."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    ratios = report.fidelity_ratios(pairs)
    for i, (stack, result) in enumerate(pairs.items()):
        if result.get("status") == "ok":
            losses = result["losses"]
            style = {"marker": ".", "color": f"C{i}", "linestyle": "--" if stack == "reference" else "-"}
            ax.plot(range(len(losses)), [losses[0] - x for x in losses], label=f"{stack}: {result['recipe']}",
                    **style)
            if stack in ratios:
                ax_ratio.plot(range(1, len(ratios[stack]) + 1), ratios[stack], label=stack, **style)
    ax.set(xlabel="optimizer step", ylabel="loss decrease since step 0")
    ax_ratio.set(xlabel="optimizer step", ylabel="loss decrease / the fp32 reference's")
    ax_ratio.axhspan(1 - report.FIDELITY_TOLERANCE, 1 + report.FIDELITY_TOLERANCE, color="0.9", label="target")
    fig.suptitle(f"{LABELS[mode]}, Llama-2-7B width (2 layers), same weights, init and batch", fontsize=9)
    for a in (ax, ax_ratio):
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    report.RESULTS_DIR.mkdir(exist_ok=True)
    fig.savefig(report.RESULTS_DIR / f"fidelity-{mode}.png", dpi=110)
    plt.close(fig)
