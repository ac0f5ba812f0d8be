"""Reading a ConnectionPolicy from the YAML file a user would ``kubectl apply``.

Kept apart from ``pgrelief.policy`` because reading a file is I/O and the model is pure core.
A file may hold several YAML documents (a Secret next to the policy, say): exactly one of them
must be a ConnectionPolicy, and every problem is reported as one ``PolicyError`` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pgrelief.policy import API_VERSION_FULL, KIND, ConnectionPolicy, PolicyError, validate_policy

__all__ = ["PolicyError", "load_policy", "parse_policy"]


def load_policy(path: str | Path) -> ConnectionPolicy:
    """The one ConnectionPolicy in the YAML file at ``path``, or PolicyError saying why not."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(["file not found"], source) from None
    except UnicodeDecodeError:
        raise PolicyError(["file is not UTF-8 text"], source) from None
    except OSError as error:
        raise PolicyError([f"cannot read the file: {error.strerror or error}"], source) from None
    return parse_policy(text, source)


def parse_policy(text: str, source: str | None = None) -> ConnectionPolicy:
    """The one ConnectionPolicy in YAML ``text`` (one or several documents)."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise PolicyError([_yaml_problem(error)], source) from None
    if not documents:
        raise PolicyError(["no YAML document found; expected a ConnectionPolicy"], source)
    if len(documents) == 1:
        # A lone document is validated whatever its kind, so a wrong apiVersion or kind is
        # reported as such rather than as "no ConnectionPolicy found".
        return validate_policy(documents[0], source)
    policies = [doc for doc in documents if _is_policy(doc)]
    if len(policies) != 1:
        found = ", ".join(_describe(doc) for doc in documents)
        raise PolicyError(
            [f"expected exactly one {KIND} ({API_VERSION_FULL}) document, found {found}"], source
        )
    return validate_policy(policies[0], source)


def _is_policy(document: Any) -> bool:
    return isinstance(document, dict) and document.get("kind") == KIND


def _describe(document: Any) -> str:
    if isinstance(document, dict):
        return str(document.get("kind") or "a document without kind")
    return type(document).__name__


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is not None:
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"YAML syntax error: {problem}"
