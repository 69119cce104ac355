"""Root conftest: the `--benchmark` switch. Without it, everything under benchmarks/ is skipped."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the minilora-vs-peft benchmarks in benchmarks/ (slow)")
    parser.addoption("--benchmark-quick", action="store_true", default=False,
                     help="with --benchmark: run the ~5 minute subset")
    parser.addoption("--benchmark-scale", action="store_true", default=False,
                     help="with --benchmark: also run the Llama-2-7B-shaped cases (~15+ minutes, ~20 GB RAM)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark") or config.getoption("--benchmark-quick"):
        return
    skip = pytest.mark.skip(reason="benchmark: pass --benchmark to run")
    for item in items:
        if "benchmarks" in item.path.parts:
            item.add_marker(skip)
