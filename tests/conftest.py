import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def real_model_dir(name: str) -> Path:
    """Folder of a real checkpoint built by ../shared/tools/make_models.sh, or skip the test."""
    root = os.environ.get("MINILORA_TEST_MODELS")
    if not root:
        pytest.skip("MINILORA_TEST_MODELS is not set: build the checkpoints with "
                    "`bash ../shared/tools/make_models.sh` and export the folder it prints")
    path = Path(root) / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is missing: run `bash ../shared/tools/make_models.sh {root}`")
    return path


def shared_data_dir() -> Path:
    """../shared/data beside the repo (or $MINILORA_SHARED_DATA), or skip the test."""
    path = Path(os.environ.get("MINILORA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set MINILORA_SHARED_DATA)")
    return path
