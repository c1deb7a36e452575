"""Hugging Face Hub access: turn "owner/name" or a local path into a local folder.

Only the files a kind needs are fetched (the transformer's weights, MAGVIT's, or the ~4 MB of
phi-1_5 tokenizer files rather than its 2.8 GB of weights). A model repo's config.json is fetched
first: a repo that already holds a converted showo-mlx folder (``"model_type": "showo"``, as
published by ``showo convert … --upload-repo``) is then downloaded as such and used in place from
the Hub cache; any other repo is treated as an official checkpoint. With HF_HUB_OFFLINE=1 the Hub
cache is used as is."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ShowoError

TOKENIZER_PATTERNS = ["tokenizer*", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"]
ALLOW_PATTERNS = {
    "model": ["config.json", "pytorch_model*.safetensors*", "pytorch_model*.bin*", "model*.safetensors*",
              *TOKENIZER_PATTERNS],
    "vq": ["config.json", "pytorch_model*.safetensors*", "pytorch_model*.bin*"],
    "tokenizer": TOKENIZER_PATTERNS,
    # microsoft/phi-1_5 for `showo init`: its safetensors weights and tokenizer, never its .bin twin
    "phi": ["config.json", "model*.safetensors*", *TOKENIZER_PATTERNS],
    "config": ["config.json"],
    # a converted showo-mlx folder: transformer (maybe sharded), MAGVIT, tokenizer, model card
    "converted": ["config.json", "*.safetensors", "*.safetensors.index.json", "README.md", *TOKENIZER_PATTERNS],
    # The CLIP tower repository also holds TF/Flax copies: fetch safetensors, the .bin only as fallback.
    "vision": ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
               "model-*.safetensors"],
    "vision_bin": ["config.json", "preprocessor_config.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                   "pytorch_model-*.bin"],
}
# The option that replaces each kind of download with a local folder (named in error messages).
LOCAL_OPTION = {"model": "--model PATH", "config": "--model PATH", "converted": "--model PATH", "vq": "--vq PATH",
                "tokenizer": "--tokenizer PATH"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Snapshot:
    """A downloaded Hub repo: its folder in the Hub cache and the commit it holds."""

    repo_id: str
    path: Path
    commit: str | None
    converted: bool = False


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
    if kind == "model":
        return fetch_model(text).path
    return download(text, kind)


def download(repo_id: str, kind: str, revision: str | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency
        raise ShowoError("huggingface_hub is not installed; pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS[kind]))
    except Exception as e:  # network, auth, missing repo: all reported in one line
        raise fetch_error(repo_id, e, kind) from None


def fetch_config(repo_id: str) -> Snapshot:
    """A model repo's config.json only (one listing call; no per-file retries when offline): which
    commit the repo is at, and whether it holds a converted showo-mlx folder."""
    folder = download(repo_id, "config")
    config = folder / "config.json"
    if not config.is_file():
        raise ShowoError(f"{repo_id} has no config.json, so it is not a Show-o model; check the name")
    try:
        converted = json.loads(config.read_text()).get("model_type") == "showo"
    except (OSError, ValueError, AttributeError):
        raise ShowoError(f"{repo_id}: its config.json is not valid JSON; is it a Show-o model?") from None
    return Snapshot(repo_id, folder, snapshot_commit(folder), converted)


def fetch_files(head: Snapshot) -> Snapshot:
    """The files the repo's kind needs (converted folder or official checkpoint), from the commit
    `fetch_config` saw."""
    path = download(head.repo_id, "converted" if head.converted else "model", revision=head.commit)
    return Snapshot(head.repo_id, path, head.commit, head.converted)


def fetch_model(repo_id: str) -> Snapshot:
    """Download a model repo: config.json first, then the files its kind needs."""
    return fetch_files(fetch_config(repo_id))


def snapshot_commit(folder: Path) -> str | None:
    """The commit hash of a folder in huggingface_hub's cache layout (…/snapshots/<commit>)."""
    folder = Path(folder)
    return folder.name if folder.parent.name == "snapshots" else None


def hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return "~/.cache/huggingface/hub"


def _kinds(e: BaseException) -> set[str]:
    # Class names along the exception's MRO and cause chain: huggingface_hub moved and renamed its
    # error classes between versions, the names stayed.
    names: set[str] = set()
    seen = 0
    while e is not None and seen < 5:
        names |= {c.__name__ for c in type(e).__mro__}
        e, seen = e.__cause__ or e.__context__, seen + 1
    return names


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def clip_words(text: str, limit: int = 140) -> str:
    """`text` on one line, cut at a word boundary (never mid-word) when longer than `limit`."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + " …"


def fetch_error(repo_id: str, e: BaseException, kind: str = "model") -> ShowoError:
    """One line that says why `repo_id` could not be fetched and what to do instead."""
    kinds = _kinds(e)
    local = f"pass a local folder ({LOCAL_OPTION.get(kind, 'a local folder')})"
    where = f"could not fetch {repo_id} from the Hugging Face Hub"
    if kinds & {"RepositoryNotFoundError", "GatedRepoError"}:
        return ShowoError(f"{where}: no such repository, or it is private or gated; check the name "
                          f"(owner/name), log in with `hf auth login` if it is private, or {local}")
    if kinds & {"RevisionNotFoundError"}:
        return ShowoError(f"{where}: the revision does not exist; check the name, or {local}")
    if "EntryNotFoundError" in kinds and "LocalEntryNotFoundError" not in kinds:
        return ShowoError(f"{where}: the repository has no config.json, so it is not a Show-o model; check the name")
    cache = hub_cache_dir()
    if _offline() or "OfflineModeIsEnabled" in kinds:
        return ShowoError(f"{where}: HF_HUB_OFFLINE is set and it is not in the Hub cache ({cache}); "
                          f"unset HF_HUB_OFFLINE to download it once, or {local}")
    if "LocalEntryNotFoundError" in kinds or kinds & {"ConnectError", "ConnectionError", "TimeoutException", "Timeout"}:
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        reason = clip_words(f"{type(root).__name__}: {root}", 100)
        return ShowoError(f"{where}: the Hub is unreachable ({reason}) and it is not in the Hub cache ({cache}); "
                          f"check your connection, or {local}")
    reason = clip_words(f"{type(e).__name__}: {e}" if str(e).strip() else type(e).__name__)
    return ShowoError(f"{where} ({reason}); check the name and your connection, or {local}")
