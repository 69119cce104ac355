"""Run one case in a fresh interpreter and return its JSON result (stdlib only: importing this is cheap)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_MARKER = "BENCH_RESULT "  # the line cases.main prints
DEFAULT_TIMEOUT_S = 1200

# Same threads for both stacks, no network, no progress bars in the captured output.
THREADS = os.environ.get("MINILORA_BENCH_THREADS", "2")
CASE_ENV = {"OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def run_case(case: str, params: dict, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """`python -m benchmarks.cases <case> <params>`; the case's dict plus `wall_s`, or
    {"status": "error", "error": <last stderr lines>} when it crashed or timed out."""
    env = {**os.environ, **CASE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.cases", case, json.dumps(params)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout_s:.0f} s", "wall_s": timeout_s}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:]) or proc.stdout[-2000:]
        return {"status": "error", "error": f"exit code {proc.returncode}: {tail}", "wall_s": wall}
    result = json.loads(lines[-1][len(RESULT_MARKER):])
    result["wall_s"] = wall
    return result
