"""Issue 9: fuzz the ingest. Mutated bytes of a real model either load and inspect, or raise UserError.

Never another exception type and never a hang: hypothesis' `deadline` reports slow examples and a SIGALRM
guard turns a true hang into a failure. The default suite runs a short, derandomised (reproducible) search;
`make fuzz` raises the example count (ONNXECC_FUZZ_EXAMPLES, default 2000 there).
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import onnxecc
from onnxecc.core.errors import UserError
from onnxecc.graph import ingest

SEED = (Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx").read_bytes()
EXAMPLES = int(os.environ.get("ONNXECC_FUZZ_EXAMPLES", "60"))
HANG_S = 30


@st.composite
def mutations(draw):
    """1–4 edits of the seed model: flip bits, overwrite, insert or delete a byte range, or truncate."""
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        # Most of the file is weights; bias positions towards the header and the graph structure too.
        pos = draw(st.one_of(st.integers(0, 512), st.integers(0, max(len(data) - 1, 0))))
        pos = min(pos, len(data))
        length = draw(st.integers(1, 64))
        if kind == "flip":
            mask = draw(st.integers(1, 255))
            for i in range(pos, min(pos + length, len(data))):
                data[i] ^= mask
        elif kind == "overwrite":
            data[pos:pos + length] = draw(st.binary(min_size=length, max_size=length))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=length))
        elif kind == "delete":
            del data[pos:pos + length]
        else:
            del data[pos:]
    return bytes(data)


@contextmanager
def hang_guard(seconds: int):
    def on_alarm(signum, frame):
        raise TimeoutError(f"ingest/inspect hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _event(what: str) -> None:
    try:
        event(what)
    except InvalidArgument:  # outside a hypothesis test
        pass


def load_and_inspect(data: bytes | onnx.ModelProto) -> None:
    """The property: success or UserError, nothing else."""
    stage = "load"
    try:
        proto = ingest.load(data)
        stage = "inspect"
        onnxecc.inspect(proto)
        _event("inspected")
    except UserError as exc:
        _event(f"UserError in {stage}")
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(exc)


SEED_PROTO = onnx.load_from_string(SEED)


@st.composite
def proto_mutations(draw):
    """Structure-aware edits that survive protobuf parsing, so the checker and inspect are exercised."""
    m = onnx.ModelProto()
    m.CopyFrom(SEED_PROTO)
    g = m.graph
    names = [x for n in g.node for x in n.input] + [o for n in g.node for o in n.output] + ["", "nowhere"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["del_node", "rewire", "op_type", "attr", "dims", "input_dim", "opset",
                                     "del_init", "dup_node", "domain"]))
        node = g.node[draw(st.integers(0, len(g.node) - 1))] if len(g.node) else None
        if kind == "del_node" and node is not None:
            g.node.remove(node)
        elif kind == "rewire" and node is not None and len(node.input):
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
        elif kind == "op_type" and node is not None:
            node.op_type = draw(st.sampled_from(["Conv", "Gemm", "MatMul", "Relu", "Add", "Concat", "Flatten",
                                                 "MaxPool", "Transpose", "Reshape", "LRN", "Identity", "Foo"]))
        elif kind == "attr" and node is not None and len(node.attribute):
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if attr.type == onnx.AttributeProto.INTS and len(attr.ints):
                attr.ints[draw(st.integers(0, len(attr.ints) - 1))] = draw(st.integers(-3, 9))
            elif attr.type == onnx.AttributeProto.INT:
                attr.i = draw(st.integers(-3, 9))
        elif kind == "dims" and len(g.initializer):
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            if len(t.dims):
                t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.integers(0, 200))
        elif kind == "input_dim":
            dim = g.input[0].type.tensor_type.shape.dim[draw(st.integers(0, 3))]
            if draw(st.booleans()):
                dim.dim_value = draw(st.integers(0, 40))
            else:
                dim.dim_param = draw(st.sampled_from(["N", "C", "H"]))
        elif kind == "opset":
            m.opset_import[0].version = draw(st.integers(0, 30))
        elif kind == "del_init" and len(g.initializer):
            del g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        elif kind == "dup_node" and node is not None:
            g.node.append(node)
        elif kind == "domain" and node is not None:
            node.domain = draw(st.sampled_from(["ai.onnx", "com.microsoft", "x.y"]))
    return m


def test_seed_model_loads():
    """The unmutated seed loads and inspects with no error at all (a UserError on it would leave every mutated
    example vacuous); the layers found are the file's Conv/Gemm nodes and the parameter count its initializers'."""
    result = onnxecc.inspect(ingest.load(SEED))
    assert [layer.name for layer in result.layers] == \
        [n.name for n in SEED_PROTO.graph.node if n.op_type in ("Conv", "Gemm")]
    assert result.layer_params == sum(int(np.prod(t.dims)) for t in SEED_PROTO.graph.initializer)


@pytest.mark.parametrize("data", [b"", SEED[:1], SEED[:-1], SEED[: len(SEED) // 2], b"\x08" * 100],
                         ids=["empty", "one byte", "minus last", "half", "varint run"])
def test_known_edge_cases(data):
    load_and_inspect(data)


@settings(max_examples=EXAMPLES, derandomize=EXAMPLES <= 100, database=None, deadline=10_000,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutations())
def test_mutated_model_loads_or_user_error(data):
    with hang_guard(HANG_S):
        load_and_inspect(data)


@settings(max_examples=EXAMPLES, derandomize=EXAMPLES <= 100, database=None, deadline=10_000,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(proto_mutations())
def test_structurally_mutated_model_loads_or_user_error(model):
    with hang_guard(HANG_S):
        load_and_inspect(model.SerializeToString())
