"""Benchmark session plumbing: run each case once per stack in a fresh subprocess, collect the rows, and at
the end print ONE comparison table and write it to benchmarks/results/: latest.*, or quick.* with
--benchmark-quick, or partial.* for a -k / -m selection. The root conftest skips this folder unless
--benchmark is given.

Set MINILORA_BENCH_DEVICE (default "cpu") to run the cases on another torch device.
"""
from __future__ import annotations

import os
import time

import pytest

from benchmarks import report
from benchmarks.runner import run_case

STACKS = ("minilora", "peft")
NO_DEVICE_CASES = ("import_time",)
_SESSION = pytest.StashKey["BenchSession"]()


class BenchSession:
    """Results of this pytest run: raw case outputs by key, and the table rows built from them."""

    def __init__(self, config: pytest.Config):
        self.quick = bool(config.getoption("--benchmark-quick"))
        self.device = os.environ.get("MINILORA_BENCH_DEVICE", "cpu")
        self.machine = report.machine_info()
        self.started = time.time()
        self.rows: list[report.Row] = []
        self.raw: dict[str, dict] = {}
        self._prepared: dict[str, dict] = {}

    def prepare(self, name: str) -> None:
        """Generate cached checkpoint `name` once, untimed; skip when minilora cannot, fail on errors."""
        if name not in self._prepared:
            self._prepared[name] = run_case("prepare", {"name": name}, timeout_s=3600)
        result = self._prepared[name]
        if result.get("status") == "missing":
            pytest.skip(f"cannot build {name}: {result['reason']}")
        if result.get("status") != "ok":
            pytest.fail(f"could not build benchmark checkpoint {name}: {result.get('error')}", pytrace=False)

    def run_pair(self, key: str, case: str, params: dict, stacks: tuple[str, ...] = STACKS,
                 rounds: int = 1) -> dict[str, dict]:
        """Run `case` for each stack, each in its own process; with rounds > 1, that many times per stack in
        ABBA order (A B B A A B ...), so a slow drift of the machine's speed hits both stacks alike, and the
        runs are pooled by `report.merge_rounds`."""
        extra = {} if case in NO_DEVICE_CASES else {"device": self.device}
        runs: dict[str, list[dict]] = {stack: [] for stack in stacks}
        for i in range(rounds):
            for stack in (stacks if i % 2 == 0 else stacks[::-1]):
                runs[stack].append(run_case(case, {**params, **extra, "stack": stack}))
        pairs = {stack: report.merge_rounds(results) for stack, results in runs.items()}
        self.raw[key] = {"case": case, "params": params, "rounds": rounds, "pairs": pairs}
        return pairs

    @staticmethod
    def check(pairs: dict[str, dict]) -> None:
        """Fail on a crashed side; skip (after recording "missing") when minilora lacks the feature."""
        errors = [f"{stack}: {r['error']}" for stack, r in pairs.items() if r.get("status") == "error"]
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)
        missing = [f"{stack}: {r['reason']}" for stack, r in pairs.items() if r.get("status") == "missing"]
        if missing:
            pytest.skip("; ".join(missing))


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config) -> BenchSession:
    if _SESSION not in pytestconfig.stash:
        pytestconfig.stash[_SESSION] = BenchSession(pytestconfig)
    return pytestconfig.stash[_SESSION]


@pytest.fixture
def compare(bench: BenchSession, benchmark):
    """compare(key, case, params, make_rows, stacks=STACKS, rounds=1) -> {stack: result}.

    Runs the case for both stacks as one pytest-benchmark round (its raw results go to extra_info, i.e.
    into --benchmark-json), adds make_rows(results) to the table, then fails / skips as `check` says.
    """
    def run(key: str, case: str, params: dict, make_rows, stacks: tuple[str, ...] = STACKS,
            rounds: int = 1) -> dict[str, dict]:
        pairs = benchmark.pedantic(bench.run_pair, args=(key, case, params, stacks, rounds), rounds=1, iterations=1)
        benchmark.extra_info.update(pairs)
        bench.rows += make_rows(pairs)
        bench.check(pairs)
        return pairs

    return run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "full_only: a benchmark left out of the --benchmark-quick subset")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--benchmark-quick"):
        return
    skip = pytest.mark.skip(reason="not in the --benchmark-quick subset")
    for item in items:
        if "benchmarks" in item.path.parts and item.get_closest_marker("full_only"):
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # pytest-benchmark would print a second table of its own (wall time of each case's subprocess pair);
    # the comparison table below replaces it. Its data still goes to --benchmark-json.
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if benchmark_session is not None and not benchmark_session.verbose:
        benchmark_session.quiet = True


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    bench = config.stash.get(_SESSION, None)
    if bench is None or not bench.rows:
        return
    machine = {**bench.machine, "duration_s": round(time.time() - bench.started),
               "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "device": bench.device}
    target_list = report.targets(bench.raw)
    command = " ".join(["pytest", *config.invocation_params.args])
    # A -k / -m selection writes partial.*, so it never replaces the table of a full run.
    name = "quick" if bench.quick else "partial" if config.getoption("keyword") or config.getoption("markexpr") \
        else "latest"
    path = report.write(bench.rows, target_list, machine, bench.raw, command, name)
    terminalreporter.write_sep("=", "minilora vs peft")
    terminalreporter.write_line(report.render_text(bench.rows, target_list, machine))
    terminalreporter.write_line(f"written: {path.with_suffix('.json')} and {path}")
