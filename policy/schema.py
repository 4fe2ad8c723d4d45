"""JSON Schema of the policy file, for ``graft policy schema`` (editor completion and linting).

Generated from the models so it cannot drift from what the loader accepts.  Editors that
check TOML against a JSON Schema (e.g. Taplo / Even Better TOML) can use it directly.  The
schema is advisory; the loader remains the authority (it also checks, for example, that a
bind rule's ``host`` goes with action "graft").
"""

from __future__ import annotations

from typing import Any

from .models import PolicyFile

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _drop_null(node: Any) -> Any:
    # TOML has no null: an optional key is simply absent, so the `{"type": "null"}` branches
    # pydantic emits for `X | None` only confuse editors.
    if isinstance(node, dict):
        node = {k: _drop_null(v) for k, v in node.items()}
        branches = node.get("anyOf")
        if isinstance(branches, list) and {"type": "null"} in branches:
            rest = [b for b in branches if b != {"type": "null"}]
            del node["anyOf"]
            if node.get("default", 0) is None:
                del node["default"]
            if len(rest) == 1:
                node = {**rest[0], **node}
            else:
                node["anyOf"] = rest
        return node
    if isinstance(node, list):
        return [_drop_null(v) for v in node]
    return node


def json_schema() -> dict[str, Any]:
    """The policy file's JSON Schema (draft 2020-12) as a dict."""
    schema = _drop_null(PolicyFile.model_json_schema(mode="validation"))
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "graft policy file, version 1",
        **{k: v for k, v in schema.items() if k != "title"},
    }
