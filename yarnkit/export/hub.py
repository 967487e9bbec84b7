"""Upload an export folder to the Hugging Face Hub with `huggingface_hub` (create the repo, then one commit).

The token comes from `HF_TOKEN` or the saved `hf auth login`; it is never printed. The endpoint is `HF_ENDPOINT`
(default https://huggingface.co). Re-running after an interruption is cheap: with `hf_xet` installed (it is in
yarnkit's venv) `upload_folder` streams large files to Xet storage, which deduplicates what it already has;
without it, the LFS batch API skips files the Hub already holds. Offline, unauthorised and not-found answers
become `ExportError`s that say what to do (`yarnkit export DIR --push-only --push-to-hub REPO` retries).

Tested against a local HTTP server speaking the subset of the Hub API this uses (tests/test_export_hub.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from yarnkit.errors import ExportError


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def push_folder(folder: Path, repo_id: str, private: bool = False, endpoint: str | None = None) -> str:
    """Upload `folder` to `repo_id` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.errors import HTTPError as TransportOrHTTPError  # the HTTP client's base error class

    endpoint = (endpoint or _endpoint()).rstrip("/")
    token = get_token()
    if token is None:
        raise ExportError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    if "/" not in repo_id:
        raise ExportError(f"--push-to-hub wants USER_OR_ORG/NAME, got {repo_id!r}")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"yarnkit export of {folder.name}")
    except HfHubHTTPError as error:
        raise _http_error(error, repo_id, endpoint) from error
    except (TransportOrHTTPError, OSError) as error:
        raise ExportError(f"cannot reach {endpoint} ({type(error).__name__}); check the network or HF_ENDPOINT, "
                          "then re-run the same command (files already uploaded are skipped)") from error
    return commit.commit_url


def _http_error(error, repo_id: str, endpoint: str) -> ExportError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return ExportError(f"{endpoint} refused the upload to {repo_id} (HTTP {status}): the token is missing, invalid "
                           "or read-only; set HF_TOKEN to a write token or run `hf auth login`")
    if status == 404:
        return ExportError(f"{endpoint}: repo {repo_id} not found and could not be created (HTTP 404); check the "
                           "namespace is yours or an organisation you can write to")
    return ExportError(f"upload to {repo_id} at {endpoint} failed (HTTP {status}): {str(error).splitlines()[0]}")
