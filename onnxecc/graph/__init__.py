"""Stage 1, graph: the model as ONNX — load and check it, normalise it, its inputs and the data that feeds them,
run it in onnxruntime, find its compute layers and channel groups, and physically remove channels (surgery).

May import `onnxecc.core` only; numpy, onnx and onnxruntime, never torch (`onnxecc inspect` and `validate` run on
an edge device). No re-exports here, so a module imports exactly the modules it names.
"""
