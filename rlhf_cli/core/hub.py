"""Uploading finished stage folders to the Hugging Face Hub: `--push-to-hub REPO` on every training stage and
`rlhf push DIR REPO` for a folder already trained.

A push needs a token and a reachable hub. Both are checked before any model loads (`check_push`), so a run that
could not upload its result fails in a second rather than after an hour of training: offline mode, a missing or
rejected token and an unreachable hub each give one line saying how to fix it. Only a finished folder (its
manifest written) is uploaded, with its model card regenerated to name the repo it is loaded from.
huggingface_hub is imported inside the functions, so the CLI's `--help` stays light.

    rlhf sft --run runs/demo --data examples/data/sft_messages.jsonl --push-to-hub me/smollm2-sft
    rlhf push runs/demo/reward me/smollm2-rm --private
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from rlhf_cli.core.errors import CheckpointError, ConfigError, RLHFError

LOGIN = "log in with `hf auth login` or set HF_TOKEN to a token with write access (huggingface.co/settings/tokens)"


class HubError(RLHFError):
    """The hub cannot take the upload: offline, no token, a rejected token, unreachable."""


def _later(repo: str, folder: str | None) -> str:
    if folder:  # `rlhf push` itself
        return f"then run `rlhf push {folder} {repo}` again"
    return f"train without --push-to-hub and push later with `rlhf push DIR {repo}`"


def check_repo_id(repo: str, flag: str = "--push-to-hub") -> None:
    if not re.fullmatch(r"([\w.-]{1,96}/)?[\w.-]{1,96}", repo) or ".." in repo or repo.endswith(".git"):
        raise ConfigError(f"{flag} {repo}: not a hub repo id; expected NAME or USER/NAME (letters, digits, '-', "
                          f"'_', '.'), such as me/smollm2-sft")


def check_push(repo: str | None, flag: str = "--push-to-hub", folder: str | None = None) -> str | None:
    """Before training: the repo id is well formed, the hub is not switched off, a token is there and accepted.
    Returns the user name the token belongs to (None when nothing is to be pushed)."""
    if not repo:
        return None
    check_repo_id(repo, flag)
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.is_offline_mode():
        raise HubError(f"{flag} {repo}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset HF_HUB_OFFLINE "
                       f"(and {LOGIN}), or {_later(repo, folder)}")
    token = get_token()
    if not token:
        raise HubError(f"{flag} {repo}: no Hugging Face token; {LOGIN}, or {_later(repo, folder)}")
    try:
        who = HfApi().whoami(token=token)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(f"{flag} {repo}: the hub rejected the token (HTTP {status}); {LOGIN}, or "
                           f"{_later(repo, folder)}") from None
        raise HubError(f"{flag} {repo}: the hub answered {status or e}; try again, or {_later(repo, folder)}") \
            from None
    except OSError as e:  # connection refused, DNS, timeout (requests' errors are OSErrors)
        reason = " ".join(str(e).split())[:120]
        raise HubError(f"{flag} {repo}: cannot reach the hub ({type(e).__name__}: {reason}); check the network "
                       f"(or HF_ENDPOINT), or {_later(repo, folder)}") from None
    return who.get("name") if isinstance(who, dict) else None


def push_folder(folder: str | Path, repo: str, *, private: bool = False, say: Callable[[str], None] = print,
                checked: bool = False) -> str:
    """Upload a finished stage folder (refusing one without its manifest) to `repo`; returns the repo's URL."""
    from rlhf_cli.core.manifest import MANIFEST, read_manifest
    from rlhf_cli.core.model_card import write_model_card

    p = Path(folder)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such folder; expected a finished stage folder (made by `rlhf sft`, "
                              f"`rlhf reward`, `rlhf ppo`, ...)")
    manifest = read_manifest(p)
    if manifest is None:
        raise CheckpointError(f"{p}: no {MANIFEST}, so not a finished stage (interrupted, or still training); "
                              f"finish it (the same command with --resume) before pushing")
    if not checked:
        check_push(repo, "rlhf push", str(p))
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id=repo, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo
    write_model_card(p, manifest.data, repo_id=repo_id)  # the card's example loads from the repo
    say(f"uploading {p} to {repo_id}{' (private)' if private else ''}")
    api.upload_folder(repo_id=repo_id, folder_path=str(p), repo_type="model",
                      commit_message=f"rlhf-cli: {manifest.stage} stage", ignore_patterns=["*.partial/**"])
    return f"https://huggingface.co/{repo_id}"


def push_if_asked(args: object, folder: Path, say: Callable[[str], None]) -> str | None:
    """After a stage finished: upload it when --push-to-hub was given. A failed upload leaves the finished folder
    as it is and says how to retry."""
    repo = getattr(args, "push_to_hub", None)
    if not repo:
        return None
    try:
        url = push_folder(folder, repo, private=bool(getattr(args, "private", False)), say=say, checked=True)
    except RLHFError:
        raise
    except Exception as e:
        reason = " ".join(str(e).split())[:160]
        raise HubError(f"--push-to-hub {repo}: the stage finished in {folder} but the upload failed "
                       f"({type(e).__name__}: {reason}); retry with `rlhf push {folder} {repo}`") from None
    say(f"pushed to {url}")
    return url
