"""6. `import minilora` vs `import peft, transformers`; 7. adapter interop (file sizes, cross-loading)."""
from __future__ import annotations

from benchmarks import report


def test_import_time(compare, bench):
    pairs = compare("import", "import_time", {"runs": 2 if bench.quick else 5},
                    lambda p: report.import_rows(report.SECTIONS["import"], p))
    assert not pairs["minilora"]["pulls_transformers"] and not pairs["minilora"]["pulls_peft"], \
        "`import minilora` must not import transformers or peft"
    assert pairs["peft"]["pulls_transformers"], "the probe must see transformers imported by the peft side"


def test_adapter_interop(compare, bench):
    bench.prepare("smollm2-135m")
    pairs = compare("interop", "interop", {},
                    lambda p: report.interop_rows(report.SECTIONS["interop"], p["both"]), stacks=("both",))
    result = pairs["both"]
    # The check means something only if the adapter visibly moves the logits.
    assert result["adapter_effect_max_abs"] > 0.05
    for stack in ("minilora", "peft"):
        assert result[stack]["loads_other_max_abs_diff"] < 1e-3 + 10 * result["base_max_abs_diff"], stack
    sizes = [result[s]["adapter_bytes"] for s in ("minilora", "peft")]
    assert abs(sizes[0] - sizes[1]) / sizes[1] < 0.01, f"adapter file sizes differ: {sizes}"
