"""Hugging Face Hub access: turn "owner/name" or a local path into a local folder.

Only the files a kind needs are fetched (the transformer's weights, MAGVIT's, or the ~4 MB of
phi-1_5 tokenizer files rather than its 2.8 GB of weights). With HF_HUB_OFFLINE=1 the Hub cache is
used as is."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ShowoError

ALLOW_PATTERNS = {
    "model": ["config.json", "pytorch_model*.safetensors*", "pytorch_model*.bin*", "model*.safetensors*",
              "tokenizer*", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"],
    "vq": ["config.json", "pytorch_model*.safetensors*", "pytorch_model*.bin*"],
    "tokenizer": ["tokenizer*", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"],
    # The CLIP tower repository also holds TF/Flax copies: fetch safetensors, the .bin only as fallback.
    "vision": ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
               "model-*.safetensors"],
    "vision_bin": ["config.json", "preprocessor_config.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                   "pytorch_model-*.bin"],
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(s: str) -> bool:
    return bool(_REPO_ID.match(s)) and not s.startswith((".", "/"))


def resolve_source(src: str | Path, kind: str) -> Path:
    """Local folder for `src`; downloads from the Hub when it is a repo id and not a local path."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ShowoError(f"{path} is a file; pass the folder that contains it")
        return path
    text = str(src)
    if not looks_like_repo_id(text):
        raise ShowoError(f"{text} does not exist and is not a Hub id (owner/name); check the path")
    return download(text, kind)


def download(repo_id: str, kind: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency
        raise ShowoError("huggingface_hub is not installed; pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS[kind]))
    except Exception as e:  # network, auth, missing repo: all reported in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShowoError(
            f"could not fetch {repo_id} from the Hugging Face Hub ({type(e).__name__}: {reason[:160]}); "
            "check the name and your connection, or pass a local folder"
        ) from None
