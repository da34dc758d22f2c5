"""onnxecc: compress an ONNX network so that it meets a hard resource budget.

The Python API mirrors the CLI: `onnxecc.inspect(path)`, `onnxecc.compress(path, budget, output, options)`,
`onnxecc.validate(original, compressed)`. Importing onnxecc does not import torch: the training side is
loaded only when a command trains.
"""

__version__ = "0.1.0"

from onnxecc.compress import CompressOptions, CompressResult, compress  # noqa: E402
from onnxecc.core.errors import UnsupportedModelError, UserError  # noqa: E402
from onnxecc.cost.profiler import Profile, load_profile, profile  # noqa: E402
from onnxecc.graph.ingest import load, save  # noqa: E402
from onnxecc.inspection import InspectResult, inspect  # noqa: E402
from onnxecc.validate import ValidateResult, validate  # noqa: E402

__all__ = ["CompressOptions", "CompressResult", "InspectResult", "Profile", "load_profile", "profile",
           "UnsupportedModelError", "UserError",
           "ValidateResult", "__version__", "compress", "inspect", "load", "save", "validate"]
