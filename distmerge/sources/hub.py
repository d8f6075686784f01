"""Adapters on the Hugging Face Hub: `hf://ORG/NAME[@REVISION][/SUBFOLDER]`.

huggingface_hub resolves the revision (a branch, tag or commit) to a commit and downloads into its
cache only what a merge reads: adapter_config.json, the safetensors files and their index, never
`*.bin` or anything else. The usual environment is honoured (HF_TOKEN, HF_HOME / HF_HUB_CACHE,
HF_HUB_OFFLINE, HF_ENDPOINT); `runtime.hub_cache` overrides the cache, which must be on storage every
Ray node sees. A token never appears in a message: errors are distmerge's own words.

The snapshot's files are symlinks into the repo's blobs, so reads are confined to the repo's cache
folder, not the snapshot. A safetensors blob is named by its sha256 (huggingface_hub checks it on
download), so its hash for the manifest is its name: an unchanged revision is not read again.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from distmerge.errors import AdapterError
from distmerge.sources import Located

FILES = ("adapter_config.json", "*.safetensors", "adapter_model.safetensors.index.json")
# hf://ORG/NAME, then @REVISION (refs/pr/N and refs/convert/NAME hold a slash), then /SUBFOLDER
URI = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>refs/pr/\d+|refs/convert/[\w.-]+|[^/@]+))?"
                 r"(?:/(?P<subfolder>[^@]*?))?/?$")
SHA256_BLOB = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None
    subfolder: str


def parse(uri: str) -> HubRef | None:
    """The parts of an hf:// path, or None when it is not one distmerge can read."""
    m = URI.match(uri)
    if not m or any(part in ("", ".", "..") for part in (m["subfolder"] or "x").split("/")):
        return None
    return HubRef(m["repo"], m["revision"], m["subfolder"] or "")


SYNTAX = "hf://ORG/NAME, hf://ORG/NAME@REVISION or hf://ORG/NAME@REVISION/SUBFOLDER"


def default_name(uri: str) -> str:
    ref = parse(uri)
    return (ref.subfolder or ref.repo).rstrip("/").split("/")[-1] if ref else uri


def blob_sha256(path: str) -> str | None:
    """The sha256 of a Hub cache blob, from its name, without reading it; None for other files."""
    name = os.path.basename(path)
    return name if os.path.basename(os.path.dirname(path)) == "blobs" and SHA256_BLOB.match(name) else None


def snapshot(ref: HubRef, files: tuple[str, ...] | list[str], cache_dir: str | None, subject: str) -> str:
    """Download (or find in the cache) the repo's `files` (patterns, under ref.subfolder); the snapshot's
    directory. huggingface_hub's errors become one line about `subject`, in distmerge's words, never theirs."""
    from huggingface_hub import constants, snapshot_download

    patterns = [f"{ref.subfolder}/{f}" if ref.subfolder else f for f in files]
    at = f"{ref.repo}@{ref.revision or 'main'}"
    try:
        return snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as e:  # huggingface_hub's errors, mapped to what the user can do; never their text
        raise _hub_error(subject, at, e, cache_dir or constants.HF_HUB_CACHE) from None


def locate(uri: str, cache_dir: str | None) -> Located:
    """Download (or find in the cache) what a merge of this adapter reads; the snapshot's directory."""
    ref = parse(uri)
    if ref is None:
        raise AdapterError(f"adapter {uri!r}: not a Hub path distmerge can read; write {SYNTAX}")
    snap = snapshot(ref, FILES, cache_dir, f"adapter {uri!r}")
    directory = os.path.join(snap, ref.subfolder) if ref.subfolder else snap
    commit = Path(snap).name
    if not os.path.isfile(os.path.join(directory, "adapter_config.json")):
        where = f" in {ref.subfolder}/" if ref.subfolder else ""
        raise AdapterError(f"adapter {uri!r}: {ref.repo} at commit {commit[:12]} has no adapter_config.json{where}; "
                           f"is it a PEFT LoRA adapter? Point at the subfolder that holds it ({SYNTAX})")
    root = os.path.realpath(Path(snap).parent.parent)  # models--ORG--NAME: snapshots link into its blobs
    hub = {"repo": ref.repo, "revision": ref.revision or "main", "commit": commit, "subfolder": ref.subfolder or None}
    return Located(directory, root, {"hub": hub}, blob_sha256)


def _hub_error(subject: str, at: str, e: Exception, cache: str) -> AdapterError:
    from huggingface_hub import errors

    repo = at.partition("@")[0]
    status = getattr(getattr(e, "response", None), "status_code", "?")
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    cases = [
        (errors.GatedRepoError, f"{repo} is gated ({token}); accept its terms on the Hub with your account "
                                f"and set HF_TOKEN to a token of that account"),
        (errors.RevisionNotFoundError, f"{repo} has no revision {at.partition('@')[2]!r}; use a branch, tag or "
                                       f"commit that exists"),
        (errors.RepositoryNotFoundError, f"the Hub has no repo {repo} you can see ({token}); check the name, or, "
                                         f"if it is private, set HF_TOKEN to a token with access"),
        (errors.LocalEntryNotFoundError, f"{at} is not in the Hugging Face cache {cache}, and the Hub was not asked "
                                         f"(HF_HUB_OFFLINE is set) or could not be reached; download it once with "
                                         f"network, or point HF_HUB_CACHE or runtime.hub_cache at a cache that has "
                                         f"it"),
        (errors.HFValidationError, f"{repo} is not a valid repo id; write {SYNTAX}"),
        (errors.HfHubHTTPError, f"the Hub refused {at} (HTTP {status}, {token}); check the repo's access and your "
                                f"token"),
        (OSError, f"cannot reach the Hub for {at} ({type(e).__name__}); check the network and HF_ENDPOINT, or set "
                  f"HF_HUB_OFFLINE=1 to use the cache"),
    ]
    for kind, why in cases:
        if isinstance(e, kind):
            return AdapterError(f"{subject}: {why}")
    return AdapterError(f"{subject}: huggingface_hub failed ({type(e).__name__}) resolving {at}; check "
                        f"the path ({SYNTAX}) and the network")
