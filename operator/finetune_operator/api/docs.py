"""Generate the field reference of docs/api.md from the CRD schema (the models' descriptions).

`python -m finetune_operator.api.docs [path]` rewrites the generated part of docs/api.md: the text
between the two markers below; the prose around it is hand-written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from finetune_operator.api.crd import TENANT_POLICY, openapi_schema

BEGIN = "<!-- BEGIN GENERATED FIELD REFERENCE (make crds) -->"
END = "<!-- END GENERATED FIELD REFERENCE -->"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "quantity"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if node.get("type") == "array":
        item = node.get("items", {})
        return f"[]{'object' if item.get('type') == 'object' else _type(item)}"
    return node.get("type", "")


def _default(node: dict[str, Any]) -> str:
    if "default" not in node or node.get("type") == "object":
        return ""
    return f"`{json.dumps(node['default'])}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _tables(node: dict[str, Any], path: str, out: list[str]) -> None:
    props = node.get("properties") or {}
    if not props:
        return
    required = set(node.get("required") or [])
    out.append(f"### `{path}`\n")
    if node.get("description") and not path.endswith((".spec", ".status")):
        out.append(_cell(node["description"]) + "\n")
    out.append("| field | type | default | description |")
    out.append("| --- | --- | --- | --- |")
    nested = []
    for name, prop in props.items():
        target = prop.get("items", prop) if prop.get("type") == "array" else prop
        label = f"`{name}`" + (" (required)" if name in required else "")
        out.append(f"| {label} | {_type(prop)} | {_default(prop)} | {_cell(prop.get('description', ''))} |")
        if target.get("properties"):
            nested.append((target, f"{path}.{name}" + ("[]" if prop.get("type") == "array" else "")))
    rules = node.get("x-kubernetes-validations") or []
    if rules:
        out.append("\nRules (enforced by the API server):\n")
        out.extend(f"- {r['message']}" for r in rules)
    out.append("")
    for child, child_path in nested:
        _tables(child, child_path, out)


def field_reference() -> str:
    schema = openapi_schema()
    out: list[str] = []
    _tables(schema["properties"]["spec"], ".spec", out)
    _tables(schema["properties"]["status"], ".status", out)
    policy = openapi_schema(TENANT_POLICY.model, TENANT_POLICY.kind, TENANT_POLICY.description)
    out.append(f"## {TENANT_POLICY.kind} (cluster-scoped)\n")
    out.append(TENANT_POLICY.description + " Written by platform admins; see docs/operations.md, \"Tenants\".\n")
    _tables(policy["properties"]["spec"], "TenantPolicy .spec", out)
    _tables(policy["properties"]["status"], "TenantPolicy .status", out)
    return "\n".join(out).rstrip() + "\n"


def render(document: str) -> str:
    before, _, rest = document.partition(BEGIN)
    _, _, after = rest.partition(END)
    return f"{before}{BEGIN}\n\n{field_reference()}\n{END}{after}"


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path("docs") / "api.md"
    path.write_text(render(path.read_text()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
