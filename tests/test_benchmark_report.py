"""The benchmark report: pooling of alternated runs (benchmarks.report.merge_rounds), the machine line."""
import pytest

from benchmarks import report


def run(times, cpu, peak):
    return {"status": "ok", "step_times_s": times, "step_cpu_times_s": cpu, "warmup": 1, "tokens_per_step": 100,
            "step_s": sorted(times[1:])[len(times[1:]) // 2], "peak_mem": peak, "process_peak_rss": peak,
            "losses": [2.0, 1.9, 1.8]}


def test_runs_are_pooled_without_their_warmups():
    merged = report.merge_rounds([run([9.0, 1.0, 2.0, 3.0], [9.0, 2.0, 4.0, 6.0], 5),
                                  run([9.0, 4.0, 5.0, 6.0], [9.0, 8.0, 10.0, 12.0], 7)])
    assert merged["timed_steps"] == 6 and merged["rounds"] == 2
    assert merged["step_s"] == pytest.approx(3.5) and merged["step_cpu_s"] == pytest.approx(7.0)
    assert merged["tokens_per_s"] == pytest.approx(100 / 3.5) and merged["peak_mem"] == 7
    assert merged["step_s_per_round"] == [2.0, 5.0]
    note = report.train_rows("s", "case", {"minilora": merged, "peft": merged})[0].note
    assert "6 steps" in note and "2 runs" in note


def test_a_failed_run_is_reported_not_pooled():
    failed = {"status": "error", "error": "boom"}
    assert report.merge_rounds([run([1.0, 2.0], [1.0, 2.0], 1), failed]) is failed
    single = run([1.0, 2.0], [1.0, 2.0], 1)
    assert report.merge_rounds([single]) is single


def test_machine_summary_names_the_cpus_bf16_matrix_instructions():
    machine = {"cpu": "AMD EPYC", "cpu_bf16": "AVX512-BF16", "cores": 2, "threads": 2, "ram_gb": 24.7,
               "versions": {}}
    assert report.machine_summary(machine).startswith("AMD EPYC (AVX512-BF16), 2 cores")
    assert report.machine_info()["cpu_bf16"] in {"AMX", "AVX512-BF16", "no native bf16 matrix instructions",
                                                 "unknown bf16 support"}
