"""Upload a finished output to the Hugging Face Hub in one commit.

The output directory is complete before anything is uploaded (it was renamed into place, or
`distmerge push` checked it against its manifest), so a failed upload leaves it as it was: the
error says so and gives the command that retries the upload alone. The token is huggingface_hub's
business (HF_TOKEN, or `hf auth login`); distmerge never reads it into a message, a log line or
the manifest, and removes anything shaped like one from the errors it passes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from typing import Any

from huggingface_hub import HfApi  # module attribute: the tests replace it with a recording stand-in

from distmerge.errors import OutputError, PushError
from distmerge.output.manifest import MANIFEST, read_manifest

log = logging.getLogger("distmerge")
# distmerge's own weight files: a re-push deletes those a previous push left (shards of a sharded output)
STALE = ["adapter_model*.safetensors", "adapter_model.safetensors.index.json"]
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")
_BAD_REF = re.compile(r"(^/|/$|//|\.\.|@\{|[\s~^:?*\[\\]|\.lock$|^\.|/\.)")


def repo_id_problem(repo_id: Any) -> str | None:
    """Why `repo_id` is not an ORG/NAME the Hub accepts, or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        return f"expected ORG/NAME (a user or organisation, then the repo's name), got {repo_id!r}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"{repo_id!r} is not a valid Hub repo id ({str(e).splitlines()[0]})"
    return None


def revision_problem(revision: Any) -> str | None:
    """Why `revision` cannot name a branch (git's ref rules, in short), or None."""
    if not isinstance(revision, str) or not revision or _BAD_REF.search(revision):
        return f"{revision!r} is not a branch name: no spaces, '..', '~^:?*[\\', and no leading or trailing '/'"
    return None


def output_files(directory: str) -> list[str]:
    """The files of a distmerge output: those its manifest lists, and the manifest."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise OutputError(f"{directory} has no readable {MANIFEST}; only a complete distmerge output is uploaded")
    return sorted({o["file"] for o in manifest["outputs"]} | {MANIFEST})


def push(directory: str, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, api: HfApi | None = None) -> str:
    """Upload the output at `directory` to `repo_id` in one commit; the commit's URL (a CommitInfo: .oid, .pr_url).

    Creates the repo (private if asked) and the branch `revision` when missing. Exactly the files
    the manifest lists are uploaded; distmerge weight files a previous push left there are deleted
    in the same commit, so the repo holds one consistent adapter.
    """
    directory = os.path.abspath(directory)
    files = output_files(directory)
    api = api if api is not None else HfApi()
    message = commit_message or f"Upload a LoRA merged by distmerge ({_summary(directory)})"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=directory, repo_type="model", revision=revision,
                                 create_pr=create_pr, commit_message=message, allow_patterns=files,
                                 delete_patterns=STALE)
    except Exception as e:  # anything huggingface_hub raises: HTTP errors, network, offline mode, validation
        raise PushError(_failed(directory, repo_id, revision, private, create_pr, commit_message, e)) from None
    log.info("pushed %s to %s%s: %s", directory, repo_id, f"@{revision}" if revision else "",
             getattr(info, "pr_url", None) or info)
    return info


def push_output(output, directory: str, api: HfApi | None = None) -> dict:
    """Push as a config's `output` section says; what a user needs to find the upload again."""
    info = push(directory, output.push_to_hub, private=output.hub_private, revision=output.hub_revision,
                create_pr=output.hub_create_pr, commit_message=output.hub_commit_message, api=api)
    done = record(output.push_to_hub, output.hub_revision, info)
    write_pushed(directory, done)
    return done


def pushed_path(directory: str) -> str:
    """Where the last successful push of an output is recorded: beside it, not in it (the output directory
    holds exactly what its manifest lists), so a batch knows what is still to push after a failure."""
    parent, name = os.path.split(os.path.abspath(directory))
    return os.path.join(parent, f".{name}.distmerge-pushed.json")


def _fingerprint(directory: str) -> str | None:
    return (read_manifest(directory) or {}).get("fingerprint")


def write_pushed(directory: str, done: dict) -> None:
    path = pushed_path(directory)
    try:
        with open(f"{path}.tmp-{os.getpid()}", "w") as f:
            json.dump({**done, "fingerprint": _fingerprint(directory)}, f)
        os.replace(f"{path}.tmp-{os.getpid()}", path)
    except OSError as e:  # the upload itself succeeded: a later batch pushes again, which is harmless
        log.warning("pushed, but cannot record it in %s (%s); a later batch will push again", path, e.strerror)


def already_pushed(output, directory: str) -> bool:
    """True when this output, as it is now, was pushed where `output` says: the batch need not push it."""
    try:
        with open(pushed_path(directory)) as f:
            last = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(last, dict) and last.get("fingerprint") == _fingerprint(directory) is not None
            and last.get("repo") == output.push_to_hub and last.get("revision") == (output.hub_revision or "main"))


def record(repo_id: str, revision: str | None, info: Any) -> dict:
    return {"repo": repo_id, "revision": revision or "main", "commit_url": str(getattr(info, "commit_url", info)),
            "oid": getattr(info, "oid", None), "pr_url": getattr(info, "pr_url", None)}


def describe(hub: dict) -> str:
    """One line: where an upload went."""
    where = f"{hub['repo']}@{hub['revision']}"
    if hub.get("pr_url"):
        return f"pushed to {where} as a pull request: {hub['pr_url']}"
    return f"pushed to {where}: {hub['commit_url']}"


def retry_command(directory: str, repo_id: str, revision: str | None = None, private: bool = False,
                  create_pr: bool = False, message: str | None = None) -> str:
    cmd = ["distmerge", "push", directory, repo_id]
    cmd += ["--private"] if private else []
    cmd += ["--revision", revision] if revision else []
    cmd += ["--create-pr"] if create_pr else []
    cmd += ["--message", message] if message else []
    return " ".join(shlex.quote(c) for c in cmd)


def redact(text: str) -> str:
    """`text` without the user's token, or anything shaped like a Hub token."""
    secrets = {os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}
    try:
        from huggingface_hub import get_token

        secrets.add(get_token())
    except Exception:
        pass
    for secret in sorted((s for s in secrets if s and len(s) >= 8), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _TOKEN.sub("hf_***", text)


def _failed(directory: str, repo_id: str, revision: str | None, private: bool, create_pr: bool,
            message: str | None, e: Exception) -> str:
    why = " ".join(str(e).split())[:300] or "no details"
    status = getattr(getattr(e, "response", None), "status_code", None)
    hint = ""
    if status in (401, 403):
        hint = f" (set HF_TOKEN to a token with write access to {repo_id.split('/')[0]})"
    elif type(e).__name__ == "OfflineModeIsEnabled":
        hint = " (HF_HUB_OFFLINE is set: unset it where the Hub can be reached)"
    at = f"@{revision}" if revision else ""
    return redact(f"the output is complete at {directory}, but uploading it to {repo_id}{at} failed: "
                  f"{type(e).__name__}: {why}{hint}; retry the upload alone with: "
                  f"{retry_command(directory, repo_id, revision, private, create_pr, message)}")


def _summary(directory: str) -> str:
    try:
        m = read_manifest(directory)
        return f"{m['method']['used']}, rank {m['method']['rank']}, {len(m['inputs'])} adapters"
    except (KeyError, TypeError):
        return "see distmerge.json"
