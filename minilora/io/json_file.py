"""Reading the small JSON files of a folder (config.json, tokenizer_config.json, adapter_config.json)."""
from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; a file that is not UTF-8, not JSON or not an object fails naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
