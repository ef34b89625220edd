"""Request bodies of the push rule endpoints.

Actions are checked further by the push service (known action names, a
``set_tweak`` string in each object), which is also where the rules of each
kind (a content rule needs a ``pattern``) are enforced.
"""

_ACTIONS = {"type": "array", "items": {"type": ["string", "object"]}}

_CONDITION = {
    "type": "object",
    "required": ["kind"],
    "properties": {
        "kind": {"type": "string"},
        "key": {"type": "string"},
        "pattern": {"type": "string"},
        "is": {"type": "string"},
        "value": {"type": ["string", "integer", "boolean", "null"]},
    },
}

# PUT /pushrules/global/{kind}/{ruleId}
SET_PUSH_RULE = {
    "type": "object",
    "required": ["actions"],
    "properties": {
        "actions": _ACTIONS,
        "conditions": {"type": "array", "items": _CONDITION},
        "pattern": {"type": "string"},
    },
}

# PUT /pushrules/global/{kind}/{ruleId}/enabled
SET_PUSH_RULE_ENABLED = {
    "type": "object",
    "required": ["enabled"],
    "properties": {"enabled": {"type": "boolean"}},
}

# PUT /pushrules/global/{kind}/{ruleId}/actions
SET_PUSH_RULE_ACTIONS = {
    "type": "object",
    "required": ["actions"],
    "properties": {"actions": _ACTIONS},
}
