"""minilora vs peft + transformers + bitsandbytes, side by side: `pytest benchmarks --benchmark`.

Every case runs in a fresh subprocess (`python -m benchmarks.cases <case> '<json params>'`), so peak memory
is per case and per stack; `benchmarks/conftest.py` collects the results into one comparison table.
"""
