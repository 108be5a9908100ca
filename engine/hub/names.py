"""Model names as users type them: ``org/repo``, ``org/repo:branch``, or a huggingface.co URL.

Validated by the Hub's rules (huggingface_hub's own repo-id check, git's ref-name rules) with a
one-line message that says what is wrong. Branches with slashes are refused: they cannot be part
of a folder name, and TheBloke-style quantization branches never have them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from loadstar.engine.errors import LoadstarError

HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
_BRANCH_FORBIDDEN = re.compile(r"[\s~^:?*\[\\\x00-\x1f\x7f]")
_MAX_BRANCH = 200


class BadModelNameError(LoadstarError):
    """The name is not ``org/repo[:branch]`` or a Hub URL."""


@dataclass(frozen=True)
class ModelRef:
    repo_id: str
    revision: str = "main"

    @property
    def folder_name(self) -> str:
        """``org_repo`` for main, ``org_repo_branch`` for another branch."""
        base = self.repo_id.replace("/", "_")
        return base if self.revision == "main" else f"{base}_{self.revision}"

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}:{self.revision}"


def parse_model_name(text: str) -> ModelRef:
    """``org/repo``, ``org/repo:branch``, ``https://huggingface.co/org/repo[/tree/branch]`` -> ModelRef."""
    name = (text or "").strip()
    if not name:
        raise BadModelNameError("give a model name like org/repo or org/repo:branch")
    if "://" in name:
        return _parse_url(name)
    name = name.rstrip("/")
    if name.count(":") > 1:
        raise BadModelNameError(f"'{name}' has more than one ':' (use org/repo:branch)")
    repo_id, _, branch = name.partition(":")
    if ":" in name and not branch:
        raise BadModelNameError(f"'{name}' has an empty branch after ':'")
    return ModelRef(_check_repo_id(repo_id.rstrip("/")), _check_branch(branch) if branch else "main")


def _parse_url(url: str) -> ModelRef:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in HUB_HOSTS:
        raise BadModelNameError(f"'{url}' is not a huggingface.co model URL")
    parts = [unquote(p) for p in parsed.path.strip("/").split("/") if p]
    if len(parts) < 2:
        raise BadModelNameError(f"'{url}' does not name a repository (expected /org/repo)")
    repo_id = _check_repo_id("/".join(parts[:2]))
    rest = parts[2:]
    if not rest:
        return ModelRef(repo_id)
    if rest[0] == "tree" and len(rest) == 2:
        return ModelRef(repo_id, _check_branch(rest[1]))
    raise BadModelNameError(f"'{url}' is not a repository or branch URL (expected /org/repo/tree/branch)")


def _check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise BadModelNameError(f"'{repo_id}' is not org/repo (both parts are needed)")
    if " " in repo_id:
        raise BadModelNameError(f"'{repo_id}' contains a space")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        first = str(error).split(":")[0].strip()
        raise BadModelNameError(f"'{repo_id}' is not a valid repo id: {first}") from None
    return repo_id


def _check_branch(branch: str) -> str:
    if "/" in branch:
        raise BadModelNameError(f"branch '{branch}' contains '/': Loadstar needs branch names without slashes")
    if _BRANCH_FORBIDDEN.search(branch):
        raise BadModelNameError(f"branch '{branch}' contains a space or one of ~ ^ : ? * [ \\")
    if ".." in branch or branch.startswith(("-", ".")) or branch.endswith((".", ".lock")) or "@{" in branch:
        raise BadModelNameError(f"branch '{branch}' is not a valid git branch name")
    if len(branch) > _MAX_BRANCH:
        raise BadModelNameError(f"branch name is longer than {_MAX_BRANCH} characters")
    return branch
