"""Turn "a local folder or a Hugging Face hub id" into local files.

Local folders are used as they are. Anything else is treated as a hub repo id and fetched with
`huggingface_hub.snapshot_download` (imported lazily, so `import minilora` never pays for it), which
also serves cached snapshots when the machine is offline.
"""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

# What a model needs: config, safetensors weights (single file or shards + index) and the tokenizer.
MODEL_FILE_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                       "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
PICKLED_WEIGHT_PATTERNS = ["pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "tf_model.h5", "flax_model.msgpack"]


def resolve_model_dir(path_or_id: str | os.PathLike, revision: str | None = None,
                      allow_patterns: Sequence[str] | None = None) -> Path:
    """Local folder holding a model's `config.json` and weights.

    `path_or_id` is either a local folder (used as is; it must contain config.json) or a hub repo id such
    as "HuggingFaceTB/SmolLM2-135M-Instruct", downloaded (config, safetensors weights and tokenizer files
    by default; pass `allow_patterns` to change that) at `revision` into the Hugging Face cache.
    """
    local = as_local_dir(path_or_id)
    if local is not None:
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} has no config.json: expected a model folder in Hugging Face "
                                    "format (config.json + model.safetensors or sharded model-*.safetensors)")
        return local

    repo_id = str(path_or_id)
    folder = snapshot(repo_id, "model", revision, list(allow_patterns or MODEL_FILE_PATTERNS))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"hub repo {repo_id!r} has no config.json: is it a model repo in Hugging Face "
                                "format (and not, e.g., a LoRA adapter or a GGUF-only repo)?")
    if not any(folder.glob("*.safetensors")):
        if _repo_has_pickled_weights(repo_id, revision):
            raise ValueError(pickled_weights_message(f"hub repo {repo_id!r}"))
        raise FileNotFoundError(f"hub repo {repo_id!r} has no *.safetensors weights")
    return folder


def resolve_files(path_or_id: str | os.PathLike, filenames: Sequence[str], repo_type: str = "model",
                  revision: str | None = None) -> list[Path]:
    """Local paths of `filenames` (plain names or glob patterns like "train-*.jsonl") in a folder or hub repo.

    `path_or_id` may be a local folder, a single local file (returned if it matches one of `filenames`),
    or a hub repo id of type `repo_type` ("model" or "dataset"). Every name or pattern must match at least
    one file; the result follows the order of `filenames`, with each pattern's matches sorted.
    """
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"repo_type must be 'model' or 'dataset', got {repo_type!r}")
    if isinstance(filenames, str):
        filenames = [filenames]
    local_file = Path(path_or_id).expanduser()
    if local_file.is_file():
        if not any(fnmatch.fnmatch(local_file.name, pattern) for pattern in filenames):
            raise FileNotFoundError(f"{local_file} does not match any of {list(filenames)}")
        return [local_file]

    folder = as_local_dir(path_or_id)
    where = str(folder)
    if folder is None:
        folder = snapshot(str(path_or_id), repo_type, revision, list(filenames))
        where = f"hub {repo_type} repo {str(path_or_id)!r}"

    found: list[Path] = []
    for pattern in filenames:
        matches = sorted(p for p in folder.glob(pattern) if p.is_file())
        if not matches:
            raise FileNotFoundError(f"{where} has no file matching {pattern!r}")
        found.extend(m for m in matches if m not in found)
    return found


def pickled_weights_message(where: str) -> str:
    return (f"{where} only has pickled PyTorch weights (pytorch_model.bin / *.pt); minilora never unpickles "
            "files because that can run arbitrary code. Convert them to safetensors once, e.g. with "
            "transformers: `AutoModel.from_pretrained(path).save_pretrained(out_dir)` "
            "(or the hub's 'Convert to Safetensors' space), then load the converted folder.")


def as_local_dir(path_or_id: str | os.PathLike) -> Path | None:
    """The local folder `path_or_id` names, None for a hub id; error for a local path that does not exist."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path.resolve()
    text = str(path_or_id)
    looks_local = (isinstance(path_or_id, os.PathLike) or text.startswith(("/", ".", "~")) or text.count("/") > 1
                   or "\\" in text or path.exists())
    if looks_local:
        raise FileNotFoundError(f"model folder {text!r} does not exist (or is not a folder)")
    return None


def snapshot(repo_id: str, repo_type: str, revision: str | None, allow_patterns: list[str]) -> Path:
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                                      allow_patterns=allow_patterns))
    except errors.RepositoryNotFoundError as e:  # also GatedRepoError
        raise FileNotFoundError(f"hub {repo_type} repo {repo_id!r} was not found (or is private/gated: log in "
                                "with `hf auth login`). For a local folder, pass its path.") from e
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f"hub {repo_type} repo {repo_id!r} has no revision {revision!r}") from e
    except Exception as e:
        if _is_network_error(e, errors):
            raise ConnectionError(_offline_message(repo_id, repo_type)) from e
        raise


def _is_network_error(e: Exception, errors) -> bool:
    if isinstance(e, errors.HfHubHTTPError):  # the hub answered (e.g. 401, 500): not a connectivity problem
        return False
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    # transport errors of whichever HTTP client this huggingface_hub version uses (httpx, requests, ...)
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _offline_message(repo_id: str, repo_type: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    reason = "HF_HUB_OFFLINE is set" if offline else "no network connection"
    return (f"could not reach the Hugging Face hub to fetch {repo_type} repo {repo_id!r} ({reason}) and it is "
            "not in the local cache. Download it on a machine with network access "
            f"(`hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''} "
            "--local-dir DIR`), copy it here and pass the local folder path instead of the repo id.")


def _repo_has_pickled_weights(repo_id: str, revision: str | None) -> bool:
    import huggingface_hub

    try:
        names = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception:  # the listing only refines the error message
        return False
    return any(fnmatch.fnmatch(name, pattern) for name in names for pattern in PICKLED_WEIGHT_PATTERNS)
