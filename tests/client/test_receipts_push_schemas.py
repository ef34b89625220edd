"""Our receipt, read marker and push rule request schemas accept the spec's examples
and refuse wrong shapes; our rule sets have the spec's response shape."""

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from client_api.schemas import push as push_schemas
from client_api.schemas import receipts as receipt_schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import validate
from homeserver.services.push_rules import ordered_ruleset
from tests.support.spec import DATA, client_server_operation, request_examples

API = DATA / "api" / "client-server"


def property_example(operation: dict[str, Any]) -> dict[str, Any]:
    """A body built from the per-property examples of the request schema."""
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    return {
        name: prop["example"] for name, prop in schema["properties"].items() if "example" in prop
    }


def examples(filename: str, path: str, method: str) -> list[Any]:
    found = request_examples(filename, path, method)
    built = property_example(client_server_operation(filename, path, method))
    return found + ([built] if built else [])


@pytest.mark.parametrize(
    ("filename", "path", "method", "schema"),
    [
        (
            "receipts.yaml",
            "/rooms/{roomId}/receipt/{receiptType}/{eventId}",
            "post",
            receipt_schemas.RECEIPT,
        ),
        ("read_markers.yaml", "/rooms/{roomId}/read_markers", "post", receipt_schemas.READ_MARKERS),
        ("pushrules.yaml", "/pushrules/global/{kind}/{ruleId}", "put", push_schemas.SET_PUSH_RULE),
        (
            "pushrules.yaml",
            "/pushrules/global/{kind}/{ruleId}/enabled",
            "put",
            push_schemas.SET_PUSH_RULE_ENABLED,
        ),
        (
            "pushrules.yaml",
            "/pushrules/global/{kind}/{ruleId}/actions",
            "put",
            push_schemas.SET_PUSH_RULE_ACTIONS,
        ),
    ],
)
def test_request_examples_validate(filename, path, method, schema):
    bodies = examples(filename, path, method)
    assert bodies, "the spec has an example"
    for body in bodies:
        assert validate(body, schema) == body


def test_spec_examples_are_the_ones_we_expect():
    assert {"thread_id": "main"} in examples(
        "receipts.yaml", "/rooms/{roomId}/receipt/{receiptType}/{eventId}", "post"
    )
    assert {
        "m.fully_read": "$somewhere:example.org",
        "m.read": "$elsewhere:example.org",
        "m.read.private": "$elsewhere:example.org",
    } in examples("read_markers.yaml", "/rooms/{roomId}/read_markers", "post")
    assert {"pattern": "cake*lie", "actions": ["notify"]} in examples(
        "pushrules.yaml", "/pushrules/global/{kind}/{ruleId}", "put"
    )


def test_every_rule_of_the_spec_ruleset_example_is_a_valid_put_body():
    ruleset = yaml.safe_load((API / "definitions" / "push_ruleset.yaml").read_text())["example"]
    count = 0
    for kind, rules in ruleset.items():
        for rule in rules:
            body = {k: rule[k] for k in ("actions", "conditions", "pattern") if k in rule}
            assert validate(body, push_schemas.SET_PUSH_RULE) == body, (kind, rule["rule_id"])
            count += 1
    assert count >= 8


def _inline_refs(node: Any, base: Path) -> Any:
    """The schema with every relative $ref replaced by the file it names."""
    if isinstance(node, dict):
        if "$ref" in node and isinstance(node["$ref"], str):
            target = (base / node["$ref"]).resolve()
            return _inline_refs(yaml.safe_load(target.read_text()), target.parent)
        return {k: _inline_refs(v, base) for k, v in node.items() if k != "example"}
    if isinstance(node, list):
        return [_inline_refs(v, base) for v in node]
    return node


def test_our_rule_set_has_the_spec_response_shape():
    operation = client_server_operation("pushrules.yaml", "/pushrules/", "get")
    schema = _inline_refs(
        operation["responses"]["200"]["content"]["application/json"]["schema"], API
    )
    user_rules = {
        "content": [{"rule_id": "cake", "pattern": "cake", "enabled": True, "actions": ["notify"]}],
        "room": [{"rule_id": "!r:x", "enabled": False, "actions": []}],
    }
    body = {"global": ordered_ruleset("@alice:example.org", user_rules, {})}
    jsonschema.validate(body, schema)
    # The spec's rule schema requires these on every rule.
    for rules in body["global"].values():
        for rule in rules:
            assert {"actions", "default", "enabled", "rule_id"} <= rule.keys()


@pytest.mark.parametrize(
    ("body", "schema"),
    [
        ({"thread_id": 1}, receipt_schemas.RECEIPT),
        ({"thread_id": ""}, receipt_schemas.RECEIPT),
        ([], receipt_schemas.RECEIPT),
        ({"m.read": 5}, receipt_schemas.READ_MARKERS),
        ({"m.fully_read": ""}, receipt_schemas.READ_MARKERS),
        ({}, push_schemas.SET_PUSH_RULE),
        ({"actions": "notify"}, push_schemas.SET_PUSH_RULE),
        ({"actions": [1]}, push_schemas.SET_PUSH_RULE),
        ({"actions": [], "conditions": [{"key": "type"}]}, push_schemas.SET_PUSH_RULE),
        (
            {"actions": [], "conditions": [{"kind": "event_property_is", "value": [1]}]},
            push_schemas.SET_PUSH_RULE,
        ),
        ({"actions": [], "pattern": 3}, push_schemas.SET_PUSH_RULE),
        ({}, push_schemas.SET_PUSH_RULE_ENABLED),
        ({"enabled": "true"}, push_schemas.SET_PUSH_RULE_ENABLED),
        ({}, push_schemas.SET_PUSH_RULE_ACTIONS),
        ({"actions": {"notify": True}}, push_schemas.SET_PUSH_RULE_ACTIONS),
    ],
)
def test_schemas_refuse_wrong_shapes(body, schema):
    with pytest.raises(MatrixError) as e:
        validate(body, schema)
    assert e.value.errcode == "M_BAD_JSON"
