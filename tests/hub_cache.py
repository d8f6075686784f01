"""A real Hugging Face cache, laid out as huggingface_hub writes one after a download, built offline
from local files: `models--ORG--NAME/blobs/<hash>`, `snapshots/<commit>/<file>` as relative symlinks
into the blobs, and `refs/<revision>` holding the commit a branch or tag points at."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def publish(cache: Path, repo: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",),
            salt: str = "") -> str:
    """Add one commit of `files` (path in repo → local file) to the cache; point `refs` at it; its sha.

    Safetensors files are LFS files on the Hub, whose blobs are named by their sha256; other files by
    their git blob sha1, as huggingface_hub names them.
    """
    folder = cache / f"models--{repo.replace('/', '--')}"
    datas = {rel: Path(src).read_bytes() for rel, src in sorted(files.items())}
    commit = hashlib.sha1((salt + repr({k: hashlib.sha256(v).hexdigest() for k, v in datas.items()})).encode()
                          ).hexdigest()
    for rel, data in datas.items():
        blob = hashlib.sha256(data).hexdigest() if rel.endswith(".safetensors") else git_blob_sha1(data)
        (folder / "blobs").mkdir(parents=True, exist_ok=True)
        (folder / "blobs" / blob).write_bytes(data)
        link = folder / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(folder / "blobs" / blob, link.parent))
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return commit


def adapter_files(path: Path, subfolder: str = "") -> dict[str, Path]:
    """A PEFT adapter directory's files, as they would sit in a repo (under `subfolder`)."""
    return {f"{subfolder}/{p.name}" if subfolder else p.name: p for p in sorted(Path(path).iterdir()) if p.is_file()}
