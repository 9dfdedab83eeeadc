"""Where a checkpoint comes from: a local directory, or a model repo on the Hugging Face Hub.

:func:`resolve_checkpoint` turns what a user passes to ``RAHF.from_pretrained`` / ``RAHFScorer.from_pretrained``
(or to any ``--checkpoint`` flag) into a local directory holding ``config.json``, ``model.safetensors`` and
the tokenizer files:

* an existing local directory is used as it is (it always wins over a repo id of the same spelling);
* a string ``org/name`` or ``org/name@revision`` (a branch, tag or commit) is a Hub model repo, fetched with
  ``huggingface_hub.snapshot_download`` into the standard Hugging Face cache (``HF_HUB_CACHE``, by default
  ``~/.cache/huggingface/hub``, laid out as ``models--org--name/snapshots/<commit>/``). Only
  :data:`ALLOW_PATTERNS` are downloaded (safetensors, JSON, sentencepiece models, the model card), never
  pickled weights;
* offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) the repo is resolved from the cache alone, with
  no network request; a repo that is not cached raises :class:`CheckpointNotFoundError` naming the repo and
  revision and saying how to get it.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Optional, Union

# What a published checkpoint consists of: weights (safetensors), config.json / tokenizer JSON / metrics.json,
# sentencepiece tokenizer models (spiece.model), and the model card.
ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.model", "README.md")
# Files that can carry pickled Python objects: never downloaded, never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill", ".npy", ".npz")
REQUIRED_FILES = ("config.json", "model.safetensors")

# "org/name" or "org/name@revision"; the Hub validates the finer rules of the names.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$")
_TRUE = {"1", "true", "yes", "on"}

PathOrRepo = Union[str, os.PathLike]


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint could not be found: no such directory, not a RAHF checkpoint, or a Hub repo that is not
    available (not cached while offline, not found, no access)."""


def parse_repo_id(name: str) -> Optional[tuple[str, Optional[str]]]:
    """``("org/name", revision or None)`` when ``name`` has the form ``org/name[@revision]``, else ``None``."""
    m = _REPO_ID.match(name)
    if m is None:
        return None
    return m["repo"], m["revision"]


def is_offline() -> bool:
    """Whether Hub downloads are off: ``HF_HUB_OFFLINE`` (read now, so a change after import counts too)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().lower() in _TRUE


def check_checkpoint_dir(directory: Path, what: Optional[str] = None) -> Path:
    """``directory`` if it holds the files of a RAHF checkpoint, else :class:`CheckpointNotFoundError`."""
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"{what or directory} is not a RAHF checkpoint: no {' and no '.join(missing)} "
            f"(a checkpoint directory holds {', '.join(REQUIRED_FILES)} and the tokenizer files)")
    return directory


def resolve_checkpoint(name_or_path: PathOrRepo, *, revision: Optional[str] = None,
                       cache_dir: Optional[PathOrRepo] = None, token: Optional[Union[str, bool]] = None,
                       local_files_only: Optional[bool] = None) -> Path:
    """The local directory of a checkpoint given as a directory or a Hub repo id (see the module docstring).

    ``revision``: a branch, tag or commit of a Hub repo (default: ``main``; ``org/name@revision`` says the
    same). ``cache_dir``: the Hugging Face cache to use (default: ``HF_HUB_CACHE``). ``token``: for private or
    gated repos (default: the saved login / ``HF_TOKEN``). ``local_files_only``: resolve from the cache only
    (default: true when ``HF_HUB_OFFLINE`` is set).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"{str(name_or_path)!r} is a local directory; revision={revision!r} only applies "
                             "to Hub repo ids")
        return check_checkpoint_dir(path)
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; give the checkpoint directory (config.json, "
                                      "model.safetensors, tokenizer files) or a Hub repo id org/name")
    parsed = parse_repo_id(name_or_path) if isinstance(name_or_path, str) else None
    if parsed is None:
        raise CheckpointNotFoundError(f"no checkpoint directory {str(name_or_path)!r} (and it is not a Hub repo "
                                      "id of the form org/name or org/name@revision)")
    repo_id, rev = parsed
    if rev is not None and revision is not None and rev != revision:
        raise ValueError(f"{name_or_path!r} names revision {rev!r} but revision={revision!r} was given")
    return download_checkpoint(repo_id, revision=rev or revision, cache_dir=cache_dir, token=token,
                               local_files_only=local_files_only)


def download_checkpoint(repo_id: str, *, revision: Optional[str] = None, cache_dir: Optional[PathOrRepo] = None,
                        token: Optional[Union[str, bool]] = None, local_files_only: Optional[bool] = None) -> Path:
    """The cached snapshot directory of a Hub repo's checkpoint files (downloading what is missing unless
    offline). Errors are :class:`CheckpointNotFoundError` naming the repo and revision."""
    from huggingface_hub import constants, snapshot_download

    try:
        from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:  # huggingface_hub < 0.25 keeps them in utils
        from huggingface_hub.utils import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                           RevisionNotFoundError)

    offline = is_offline() if local_files_only is None else bool(local_files_only)
    rev = revision or "main"
    what = f"Hub repo {repo_id!r} (revision {rev!r})"
    cache = Path(cache_dir).expanduser() if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    try:
        snapshot = snapshot_download(repo_id, revision=rev, cache_dir=str(cache), token=token,
                                     local_files_only=offline, allow_patterns=list(ALLOW_PATTERNS),
                                     library_name="rahf")
    except HFValidationError as e:
        raise CheckpointNotFoundError(f"{repo_id!r} is neither a local directory nor a valid Hub repo id: {e}") from e
    except RevisionNotFoundError as e:
        raise CheckpointNotFoundError(f"{what}: the repo has no such branch, tag or commit") from e
    except RepositoryNotFoundError as e:  # also gated repos and bad credentials
        raise CheckpointNotFoundError(
            f"{what} was not found on the Hub, or it is private/gated and no valid token was given "
            "(pass token=..., set HF_TOKEN, or run `hf auth login`)") from e
    except LocalEntryNotFoundError as e:
        how = (f"download it once with network access (`hf download {repo_id}"
               + (f" --revision {rev}" if rev != "main" else "") + "` or by loading it online), or pass the path of "
               "a local copy (a directory holding config.json and model.safetensors)")
        if offline:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            state = "is only partly" if type(e).__name__ == "IncompleteSnapshotError" else "is not"
            raise CheckpointNotFoundError(
                f"{what} {state} in the Hugging Face cache {cache} and downloads are off ({why}): {how}") from e
        raise CheckpointNotFoundError(f"{what} could not be fetched and is not in the Hugging Face cache "
                                      f"{cache} ({type(e).__name__}: {e}); {how}") from e
    return check_checkpoint_dir(Path(snapshot), what)


# ---------------------------------------------------------------------------------------------- publishing
def publishable_files(directory: str | os.PathLike) -> list[str]:
    """The files of ``directory`` (top level) that a push uploads: those matching :data:`ALLOW_PATTERNS`."""
    from fnmatch import fnmatchcase

    d = Path(directory)
    return sorted(p.name for p in d.iterdir()
                  if p.is_file() and any(fnmatchcase(p.name, pat) for pat in ALLOW_PATTERNS))


def prepare_upload(directory: str | os.PathLike, *, load: bool = True) -> list[str]:
    """Check that ``directory`` is a publishable checkpoint and list the files a push uploads.

    Refuses (:class:`CheckpointNotFoundError` / ``ValueError``) a directory without ``config.json`` and
    ``model.safetensors``, one holding files that can carry pickles (:data:`PICKLE_SUFFIXES`, anywhere
    below it), and, with ``load``, one whose checkpoint does not load with ``RAHF.from_pretrained``.
    Other files (logs, reports, sub-directories) are not uploaded.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint directory {d}")
    check_checkpoint_dir(d)
    pickles = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{d} holds files that can carry pickled code ({', '.join(pickles[:5])}"
                         + (f", ... {len(pickles) - 5} more" if len(pickles) > 5 else "")
                         + "); a published checkpoint is safetensors only: remove them or push a clean copy")
    if load:
        from .rahf_model import RAHF

        try:
            RAHF.from_pretrained(d)
        except Exception as e:
            raise ValueError(f"{d} does not load as a RAHF checkpoint: {type(e).__name__}: {e}") from e
    return publishable_files(d)


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, revision: Optional[str] = None,
                private: Optional[bool] = None, token: Optional[str] = None, commit_message: Optional[str] = None,
                license: Optional[str] = None, datasets: Optional[list[str]] = None,
                overwrite_card: bool = False):
    """Publish the checkpoint in ``directory`` as the Hub model repo ``repo_id``.

    Regenerates the model card (``README.md``, see :mod:`rahf.model.card`), checks the directory
    (:func:`prepare_upload`), creates the repo if needed (``private`` applies to a new repo), and the branch
    ``revision`` if it is not ``main``, then uploads the :func:`prepare_upload` files in one commit.
    Returns ``huggingface_hub``'s ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    from .card import write_model_card

    if parse_repo_id(repo_id) is None or "@" in repo_id:
        raise ValueError(f"--repo must be a Hub repo id of the form org/name, not {repo_id!r}")
    check_checkpoint_dir(Path(directory))
    write_model_card(directory, repo_id=repo_id, license=license, datasets=datasets, overwrite=overwrite_card)
    files = prepare_upload(directory)
    if is_offline():
        raise RuntimeError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    api = HfApi(token=token, library_name="rahf")
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model", revision=revision,
                             allow_patterns=[glob.escape(f) for f in files], commit_message=commit_message or f"Upload RAHF model ({len(files)} files)")
