"""The compression methods by name, like the channel rules (`graph.channels.RULES`): `compress`, the CLI's help and
`sweep` read this table. A new method: one module with a `base.Method` subclass, its line here, and a test."""

from __future__ import annotations

from onnxecc.core.errors import UserError
from onnxecc.methods.base import Method
from onnxecc.methods.ecc import Ecc
from onnxecc.methods.greedy import Greedy
from onnxecc.methods.project import Project
from onnxecc.methods.uniform import Uniform
from onnxecc.methods.wsp import Wsp

METHODS: dict[str, Method] = {m.name: m for m in (Project(), Ecc(), Uniform(), Greedy(), Wsp())}


def get(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}': choose one of auto, {', '.join(METHODS)}")
    return METHODS[name]
