"""Pushing EvoPress checkpoints to the Hugging Face Hub and loading them back with their search result."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from .configuration import CONFIG_NAME
from .export import LEFTOVER_PREFIX
from .model_card import HEATMAP_NAME, model_card_text, save_heatmap

__all__ = ["HubPushError", "check_checkpoint_dir", "check_push", "push_checkpoint", "load_compressed", "read_record"]


class HubPushError(OSError):
    """The Hub refused the upload or could not be reached; the error says which. Nothing was committed."""


def check_checkpoint_dir(directory: str | os.PathLike) -> dict[str, Any]:
    """Returns the record of an EvoPress checkpoint directory; a `ValueError` when `directory` is not one."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory!r} is not a directory; expected a checkpoint written by EvoPressCompressor")
    missing = [name for name in ("config.json", CONFIG_NAME) if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise ValueError(f"{directory!r} is not an EvoPress checkpoint: {' and '.join(missing)} missing "
                         "(write one with EvoPressCompressor.save_pretrained or `evopress compress`)")
    return read_record(directory)


_DOWNLOAD_ARGUMENTS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download")


def read_record(path: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    """The `evopress_config.json` record (config, levels, search result) of a local checkpoint or Hub repo.

    `hub_kwargs` (`revision`, `token`, `cache_dir`, `local_files_only`, `subfolder`) choose the Hub file, as
    for `from_pretrained`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        file = os.path.join(path, hub_kwargs.get("subfolder") or "", CONFIG_NAME)
        if not os.path.isfile(file):
            raise ValueError(f"{path!r} is not an EvoPress checkpoint: no {CONFIG_NAME}")
    elif path.count("/") > 1 or path.startswith((".", "~", os.sep)) or os.path.exists(path):
        raise FileNotFoundError(f"no EvoPress checkpoint directory at {path!r}")
    else:
        from huggingface_hub import hf_hub_download  # noqa: PLC0415
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError  # noqa: PLC0415

        try:
            file = hf_hub_download(path, CONFIG_NAME, **{key: value for key, value in hub_kwargs.items()
                                                          if key in _DOWNLOAD_ARGUMENTS and value is not None})
        except (EntryNotFoundError, RepositoryNotFoundError) as err:
            raise FileNotFoundError(f"{path!r}: no local directory and no Hub repo with {CONFIG_NAME} "
                                    f"({type(err).__name__})") from err
    with open(file, encoding="utf-8") as handle:
        record = json.load(handle)
    if not isinstance(record, dict) or "config" not in record or "levels" not in record:
        raise ValueError(f"{file!r} is not an EvoPress checkpoint record (no `config` and `levels`)")
    return record


def check_push(repo_id: str, token: str | bool | None) -> str:
    """Checks `repo_id` and finds the token before anything is written or uploaded; returns the token."""
    from huggingface_hub import get_token  # noqa: PLC0415
    from huggingface_hub.utils import validate_repo_id  # noqa: PLC0415

    if not isinstance(repo_id, str) or repo_id.count("/") > 1:
        raise ValueError(f"push_to_hub: repo_id must be 'name' or 'namespace/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise ValueError(f"push_to_hub: repo_id {repo_id!r} is not a valid Hub repo id: {err}") from None
    if token is False:
        raise ValueError("push_to_hub: token=False; pushing needs a Hub token with write access")
    token = token if isinstance(token, str) else get_token()
    if not token:
        raise ValueError("push_to_hub: no Hub token; pass token=..., set HF_TOKEN or run `hf auth login`")
    return token


def push_checkpoint(directory: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                    commit_message: str | None = None, token: str | None = None, revision: str | None = None,
                    create_pr: bool = False) -> str:
    """Uploads a saved EvoPress checkpoint to `repo_id` in one commit and returns the commit URL.

    The model card is written for the repo (its usage snippet names it) and uploaded with the heat map;
    `directory` itself is not changed. The repo (and the `revision` branch) is created when missing; the commit
    is all-or-nothing on the Hub, so a failed push commits nothing (a repo it created stays, empty).

    Raises:
        ValueError: `directory` is not an EvoPress checkpoint, `repo_id` is not a valid repo id, or no token.
        HubPushError: the Hub refused the request (bad token, no write access) or could not be reached.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants  # noqa: PLC0415
    from huggingface_hub.errors import HTTPError  # noqa: PLC0415

    record = check_checkpoint_dir(directory)
    token = check_push(repo_id, token)

    directory = os.fspath(directory)
    operations = []
    for root, folders, files in os.walk(directory):
        folders[:] = [name for name in folders if not name.startswith(LEFTOVER_PREFIX)]  # an interrupted write's
        for name in sorted(files):
            full = os.path.join(root, name)
            relative = os.path.relpath(full, directory).replace(os.sep, "/")
            if relative != "README.md":
                operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=full))
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as scratch:
        # The heat map `save_pretrained` drew is uploaded as it is; one is drawn only for a directory without it.
        heatmap = os.path.isfile(os.path.join(directory, HEATMAP_NAME))
        if not heatmap and save_heatmap(record, os.path.join(scratch, HEATMAP_NAME)):
            heatmap = True
            operations.append(CommitOperationAdd(path_in_repo=HEATMAP_NAME,
                                                 path_or_fileobj=os.path.join(scratch, HEATMAP_NAME)))
        method = record["config"]["method"]
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            # The card names the repo as created (`name` becomes `user/name`).
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card_text(
                record, repo_id=url.repo_id, heatmap=heatmap).encode("utf-8")))
            if revision is not None and not revision.startswith("refs/pr/"):
                api.create_branch(url.repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(
                url.repo_id, operations, revision=revision, create_pr=create_pr,
                commit_message=commit_message or f"EvoPress {method} checkpoint (target {record['config']['target']:g})")
        except (HTTPError, OSError) as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            reason = (f"the token was refused (HTTP {status}); it needs write access to {repo_id!r}"
                      if status in (401, 403) else str(err).strip())
            raise HubPushError(f"push_to_hub: could not push to {repo_id!r} at {constants.ENDPOINT}: {reason}; "
                               "nothing was committed") from err
    return info.pr_url or info.commit_url


def load_compressed(path_or_repo: str | os.PathLike, **kwargs: Any):
    """Loads an EvoPress checkpoint (local directory or Hub repo) as `(model, record)`.

    `model` comes from `AutoModelForCausalLM.from_pretrained(path_or_repo, **kwargs)`; `record` is its
    `evopress_config.json`: `record["config"]` the `EvoPressConfig` fields, `record["levels"]` the level per unit,
    plus the budget reached, fitness, perplexity and search history. The record is read from the same revision,
    with the same token, cache and subfolder as the model.
    """
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    record = read_record(path_or_repo, **kwargs)
    return AutoModelForCausalLM.from_pretrained(os.fspath(path_or_repo), **kwargs), record
