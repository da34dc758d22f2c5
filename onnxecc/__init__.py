"""onnxecc: compress an ONNX network so that it meets a hard resource budget.

The Python API mirrors the CLI: `onnxecc.inspect(path)`; more commands join as they are built.
"""

from onnxecc.errors import UnsupportedModelError, UserError
from onnxecc.ingest import load, save
from onnxecc.inspection import InspectResult, inspect

__version__ = "0.1.0"
__all__ = ["InspectResult", "UnsupportedModelError", "UserError", "inspect", "load", "save", "__version__"]
