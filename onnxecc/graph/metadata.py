"""The onnxecc.* metadata a compressed model carries (metric, budget, costs, method, ...): written by the methods
and `compress`, read back by `validate`. JSON values under one key prefix, in the model's metadata_props.
"""

from __future__ import annotations

import json

import onnx

META_PREFIX = "onnxecc."


def read_metadata(model: onnx.ModelProto) -> dict:
    """The onnxecc.* metadata_props written by `compress` (values are JSON)."""
    out = {}
    for prop in model.metadata_props:
        if prop.key.startswith(META_PREFIX):
            try:
                out[prop.key[len(META_PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[prop.key[len(META_PREFIX):]] = prop.value
    return out


def write_metadata(model: onnx.ModelProto, values: dict) -> None:
    for key, value in values.items():
        full = META_PREFIX + key
        for prop in model.metadata_props:
            if prop.key == full:
                prop.value = json.dumps(value)
                break
        else:
            model.metadata_props.add(key=full, value=json.dumps(value))
