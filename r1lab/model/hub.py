"""Hugging Face Hub ids as model folders.

A model is named by a local folder, a stage run dir or a hub id (`org/name`, optionally
pinned to a revision with `org/name@REV`: a branch, tag or commit). A hub id is fetched once
through `huggingface_hub.snapshot_download` into its usual cache (HF_HOME / HF_HUB_CACHE),
then read from there; `HF_HUB_OFFLINE=1` reads the cache only. Only the files a model
needs are fetched (config, safetensors weights, tokenizer files).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


class HubError(OSError):
    """A hub id could not be turned into a local folder; the message says why and what to do."""

    def __str__(self) -> str:  # OSError's own str would show an errno tuple
        return self.args[0] if self.args else "hub error"


def is_hub_id(name: object) -> bool:
    return isinstance(name, str) and bool(HUB_ID.match(name))


def split_revision(spec: str) -> tuple[str, str | None]:
    """("org/name", "rev") from "org/name@rev"; the revision is None when not pinned."""
    repo, _, revision = spec.partition("@")
    return repo, revision or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(spec: str) -> Path:
    """The local snapshot folder of hub model `spec` (downloaded or from the cache)."""
    repo, revision = split_revision(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise HubError(
            f"{spec!r} is not a local folder, so it was taken as a Hugging Face Hub id; "
            "fetching it needs huggingface_hub: pip install 'r1lab[hub]' "
            "(or download the model elsewhere and pass its folder)"
        ) from err
    kwargs = dict(revision=revision, allow_patterns=PATTERNS)
    if offline():
        try:
            return Path(snapshot_download(repo, local_files_only=True, **kwargs))
        except Exception as err:
            raise HubError(
                f"{spec!r} is not a local folder and HF_HUB_OFFLINE is set, but it is not in "
                f"the Hugging Face cache ({type(err).__name__}: {err}); fetch it once with the "
                f"network on (huggingface-cli download {repo}), point HF_HOME at a cache that "
                "has it, or pass a local model folder"
            ) from err
    try:
        return Path(snapshot_download(repo, **kwargs))
    except Exception as err:
        try:  # no network (or the hub is down): a cached snapshot still serves
            return Path(snapshot_download(repo, local_files_only=True, **kwargs))
        except Exception:
            pass
        raise HubError(
            f"{spec!r} is not a local folder and could not be fetched from the Hugging Face "
            f"Hub ({type(err).__name__}: {err}); check the path, the repository name"
            f"{' and revision' if revision else ''}, the network, and for a gated or private "
            "model `huggingface-cli login`; without network, set HF_HUB_OFFLINE=1 to use the "
            "local cache"
        ) from err
