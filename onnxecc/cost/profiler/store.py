"""The profile JSON: schema, model fingerprint, atomic writes, and validation of what is read back.

A profile records what was measured and how (model fingerprint, provider and its options, meter, machine,
settings), every sample (kept width of each width variable → median measurement and IQR), and the fitted
model (constant + one non-negative coefficient per compute layer and per width variable, the width step
of the features, held-out errors). It is written atomically after every sample, so an interrupted run can
be resumed and a reader never sees half a file. Every problem with a file read back is a one-line UserError.

Standard library, numpy and onnx only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxecc.core import atomic
from onnxecc.core.errors import UserError
from onnxecc.graph import ingest

FORMAT = "onnxecc-profile"
SCHEMA = 1
UNITS = {"latency": "s", "energy": "J"}


# ---- fingerprint -------------------------------------------------------------------------------------------------
def fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the graph's structure: op types, attributes, edges, input shapes, weight shapes and dtypes.

    Floating-point weight *values* are left out (a fine-tuned model keeps its profile); integer constants
    (shapes, axes, indices) are structure and are included. Tensor names are replaced by where they come
    from, so renaming tensors does not matter either."""
    h = hashlib.sha256()
    names: dict[str, str] = {}

    def put(*parts) -> None:
        h.update(repr(parts).encode())
        h.update(b"\n")

    put("opsets", sorted((o.domain, o.version) for o in model.opset_import))
    _graph(model.graph, names, put, "")
    return h.hexdigest()


def _tensor_key(t: onnx.TensorProto) -> tuple:
    key = (int(t.data_type), tuple(int(d) for d in t.dims))
    np_type = onnx.helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type else None
    if np_type is not None and np.dtype(np_type).kind in "iub" and int(np.prod(t.dims)) <= 256:
        try:
            return key + (tuple(onnx.numpy_helper.to_array(t).ravel().tolist()),)
        except Exception:  # external or odd data: the shape is enough
            return key
    return key


def _value_info_key(vi: onnx.ValueInfoProto) -> tuple:
    if not vi.type.HasField("tensor_type"):
        return (vi.type.WhichOneof("value"),)
    tt = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else "?" for d in tt.shape.dim) \
        if tt.HasField("shape") else None
    return (int(tt.elem_type), dims)


def _graph(graph: onnx.GraphProto, names: dict[str, str], put, prefix: str) -> None:
    init_names = set()
    for k, t in enumerate(graph.initializer):
        names[t.name] = f"{prefix}c{k}"
        init_names.add(t.name)
        put("init", names[t.name], _tensor_key(t))
    for k, inp in enumerate(i for i in graph.input if i.name not in init_names):
        names[inp.name] = f"{prefix}i{k}"
        put("input", names[inp.name], _value_info_key(inp))
    for i, node in enumerate(graph.node):
        inputs = tuple(names.get(x, f"?{x}") if x else "" for x in node.input)
        attrs = []
        for a in sorted(node.attribute, key=lambda a: a.name):
            if a.type == onnx.AttributeProto.TENSOR:
                attrs.append((a.name, _tensor_key(a.t)))
            elif a.type == onnx.AttributeProto.GRAPH:
                _graph(a.g, names, put, f"{prefix}{i}.{a.name}.")
                attrs.append((a.name, "graph"))
            elif a.type == onnx.AttributeProto.GRAPHS:
                for j, sub in enumerate(a.graphs):
                    _graph(sub, names, put, f"{prefix}{i}.{a.name}{j}.")
                attrs.append((a.name, "graphs"))
            else:
                value = onnx.helper.get_attribute_value(a)
                attrs.append((a.name, value.decode() if isinstance(value, bytes) else
                              tuple(v.decode() if isinstance(v, bytes) else v for v in value)
                              if isinstance(value, (list, tuple)) else value))
        put("node", node.domain, node.op_type, inputs, len(node.output), tuple(attrs))
        for j, o in enumerate(node.output):
            if o:
                names[o] = f"{prefix}n{i}.{j}"
    put("outputs", tuple(names.get(o.name, "?") for o in graph.output))


# ---- the profile object ---------------------------------------------------------------------------------------------
@dataclass
class Fit:
    """The fitted model: E(w) = constant + Σ_l layers[l]·f_l(w) + Σ_v linear[v]·w_v/S_v, where f_l is layer l's
    MACs fraction at widths w (with widths snapped up to multiples of `step` when step > 1)."""

    variant: str
    step: int
    weighting: str
    constant: float
    layers: dict[str, float]
    linear: dict[int, float]
    holdout: dict
    train: dict
    variants: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"variant": self.variant, "step": self.step, "weighting": self.weighting, "constant": self.constant,
                "layers": self.layers, "linear": {str(k): v for k, v in self.linear.items()},
                "holdout": self.holdout, "train": self.train, "variants": self.variants}


@dataclass
class Profile:
    """A measured profile of one model on one target (see the module docstring)."""

    fingerprint: str
    source: str
    metric: str
    unit: str
    provider: str
    provider_options: dict
    meter: dict
    machine: dict
    settings: dict
    # {"group": id, "units": n, "prunable": bool[, "channels_per_unit": c (a head's channels; absent: 1)]}, in
    # `unit_classes` order: widths count units, the width step counts channels
    variables: list[dict]
    layers: list[dict]  # {"name": ..., "macs": ...}, in graph order
    samples: list[dict] = field(default_factory=list)
    fit: Fit | None = None
    tool_version: str = ""
    profiling_s: float = 0.0
    path: Path | None = None
    # `--knobs width,precision`: the int8 measurement (`onnxecc.cost.quantize.PrecisionProfile.as_dict` plus the model
    # fingerprint, provider, threads, calibration and int8 samples at pruned widths); None for width-only profiles
    precision: dict | None = None
    # nodes per execution provider in the full model's session (`onnxecc.graph.runtime.placement`): where the samples
    # actually ran, the provider's unsupported nodes on the CPU; None when not recorded
    placement: dict | None = None

    def as_dict(self) -> dict:
        return {
            "format": FORMAT, "schema": SCHEMA, "tool": {"name": "onnxecc", "version": self.tool_version},
            "model": {"fingerprint": self.fingerprint, "source": self.source},
            "metric": self.metric, "unit": self.unit,
            "provider": self.provider, "provider_options": self.provider_options,
            **({"placement": self.placement} if self.placement is not None else {}),
            "meter": self.meter, "machine": self.machine, "settings": self.settings,
            "variables": self.variables, "layers": self.layers,
            "fit": self.fit.as_dict() if self.fit is not None else None,
            "profiling_s": self.profiling_s,
            **({"precision": self.precision} if self.precision is not None else {}),
            "samples": self.samples,
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path) if path is not None else self.path
        atomic.write_with(path, lambda f: f.write(_dumps(self.as_dict()).encode()))
        self.path = path
        return path


def _dumps(obj: dict) -> str:
    """Indented JSON, but one line per sample (a profile with hundreds of samples stays readable)."""
    samples = obj.get("samples", [])
    head = json.dumps({k: v for k, v in obj.items() if k != "samples"}, indent=2)
    lines = ",\n".join("    " + json.dumps(s) for s in samples)
    return head[:-2] + ',\n  "samples": [\n' + lines + ("\n  ]\n}\n" if samples else "  ]\n}\n")


def cpu_name() -> str:
    """This machine's CPU model ("" when unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def same_cpu(machine: dict) -> bool | None:
    """Whether `machine` (a profile's `machine` field) names this machine's CPU; None when either is unknown. A
    latency model fitted on one CPU mispredicts another (the AMD EPYC demo profiles on an Intel Xeon)."""
    there, here = machine.get("cpu"), cpu_name()
    return None if not there or not here else there == here


def for_this_cpu(paths, model) -> Path | None:
    """The first of the profiles `paths` (of `model`) measured on this machine's CPU; None when none was."""
    return next((Path(p) for p in paths if same_cpu(load_profile(p, model).machine)), None)


def machine_info() -> dict:
    """Where the profile was measured (no host names or users)."""
    import onnxruntime as ort

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "system": platform.system(), "release": platform.release(),
            "machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "numpy": np.__version__, "onnxruntime_providers": ort.get_available_providers()}


# ---- reading back ----------------------------------------------------------------------------------------------------
def load_profile(path: str | os.PathLike, model: ingest.ModelSource | None = None) -> Profile:
    """Read a profile; with `model` (a path or ModelProto), check that it was measured on this model's structure
    (UserError if not)."""
    prof = read(path)
    if model is not None:
        proto = model if isinstance(model, onnx.ModelProto) else ingest.load(model)
        check_model(prof, fingerprint(proto), path)
    return prof


def read(path: str | os.PathLike, *, require_fit: bool = True) -> Profile:
    """Parse and validate a profile file; any problem is a one-line UserError naming the file and the field."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"profile not found: {path} — run `onnxecc profile MODEL -o {path}` first")
    if path.is_dir():
        raise UserError(f"profile {path} is a directory, not a JSON file")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"profile {path} is not JSON (binary data): pass the file written by `onnxecc profile`")\
            from None
    except json.JSONDecodeError as exc:
        raise UserError(f"profile {path} is not valid JSON (line {exc.lineno}: {exc.msg}): pass the file "
                        "written by `onnxecc profile`") from None
    return from_dict(data, path, require_fit=require_fit)


def _bad(path, what: str) -> UserError:
    return UserError(f"profile {path} is not a valid onnxecc profile: {what} — re-run `onnxecc profile`")


def _get(data, key: str, types, path, where: str = ""):
    name = f"{where}{key}"
    if not isinstance(data, dict) or key not in data:
        raise _bad(path, f"missing field '{name}'")
    value = data[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise _bad(path, f"field '{name}' has the wrong type ({type(value).__name__})")
    return value


_NUM = (int, float)


def from_dict(data, path, *, require_fit: bool = True) -> Profile:
    if not isinstance(data, dict):
        raise _bad(path, "the top level is not a JSON object")
    if data.get("format") != FORMAT:
        raise _bad(path, f"field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
    schema = _get(data, "schema", int, path)
    if schema != SCHEMA:
        raise UserError(f"profile {path} has schema {schema}; this onnxecc reads schema {SCHEMA}: re-run "
                        "`onnxecc profile` with this version")
    model = _get(data, "model", dict, path)
    fp = _get(model, "fingerprint", str, path, "model.")
    metric = _get(data, "metric", str, path)
    if metric not in UNITS:
        raise _bad(path, f"metric {metric!r} is not latency or energy")
    variables = _get(data, "variables", list, path)
    for k, v in enumerate(variables):
        _get(v, "group", int, path, f"variables[{k}].")
        _get(v, "units", int, path, f"variables[{k}].")
        if "channels_per_unit" in v and _get(v, "channels_per_unit", int, path, f"variables[{k}].") < 1:
            raise _bad(path, f"variables[{k}].channels_per_unit must be a positive integer")
    layers = _get(data, "layers", list, path)
    for k, v in enumerate(layers):
        _get(v, "name", str, path, f"layers[{k}].")
        _get(v, "macs", _NUM, path, f"layers[{k}].")
    samples = _get(data, "samples", list, path)
    for k, s in enumerate(samples):
        widths = _get(s, "widths", list, path, f"samples[{k}].")
        if len(widths) != len(variables) or not all(isinstance(w, int) for w in widths):
            raise _bad(path, f"samples[{k}].widths must list {len(variables)} integers")
        _get(s, "value", _NUM, path, f"samples[{k}].")
        _get(s, "index", int, path, f"samples[{k}].")
    fit = data.get("fit")
    if fit is None:
        if require_fit:
            raise UserError(f"profile {path} has no fitted model (the profiling run did not finish): re-run the same "
                            "`onnxecc profile` command to resume it")
        fit_obj = None
    else:
        coefs = _get(fit, "layers", dict, path, "fit.")
        linear = _get(fit, "linear", dict, path, "fit.")
        names = {v["name"] for v in layers}
        for name, c in coefs.items():
            if name not in names or not isinstance(c, _NUM) or c < 0:
                raise _bad(path, f"fit.layers[{name!r}] must be a non-negative number of a listed layer")
        lin = {}
        for key, c in linear.items():
            if not key.isdigit() or int(key) >= len(variables) or not isinstance(c, _NUM) or c < 0:
                raise _bad(path, f"fit.linear[{key!r}] must be a non-negative number of a listed variable")
            lin[int(key)] = float(c)
        constant = float(_get(fit, "constant", _NUM, path, "fit."))
        fit_obj = Fit(variant=str(fit.get("variant", "")), step=_get(fit, "step", int, path, "fit."),
                      weighting=str(fit.get("weighting", "")), constant=constant,
                      layers={k: float(v) for k, v in coefs.items()}, linear=lin,
                      holdout=_get(fit, "holdout", dict, path, "fit."), train=fit.get("train") or {},
                      variants=fit.get("variants") or {})
    tool = data.get("tool") if isinstance(data.get("tool"), dict) else {}
    return Profile(
        fingerprint=fp, source=str(model.get("source", "")), metric=metric, unit=str(data.get("unit", UNITS[metric])),
        provider=_get(data, "provider", str, path), provider_options=data.get("provider_options") or {},
        meter=_get(data, "meter", dict, path), machine=data.get("machine") or {},
        settings=_get(data, "settings", dict, path), variables=variables, layers=layers, samples=samples,
        fit=fit_obj, tool_version=str(tool.get("version", "")), profiling_s=float(data.get("profiling_s") or 0.0),
        path=Path(path), precision=_precision(data, fp, layers, path),
        placement=data["placement"] if isinstance(data.get("placement"), dict) else None,
    )


def _precision(data: dict, fp: str, layers: list, path) -> dict | None:
    """The optional `precision` section, checked field by field (a hand-edited one is a one-line UserError, not a
    KeyError deep in compress): it must be of this profile's model, provider and threads, list only its layers,
    and hold positive timings."""
    sec = data.get("precision")
    if sec is None:
        return None
    if not isinstance(sec, dict):
        raise _bad(path, "field 'precision' is not an object")
    if _get(sec, "fingerprint", str, path, "precision.") != fp:
        raise _bad(path, "precision.fingerprint is not the profile's model (the int8 measurement is of another model)")
    if _get(sec, "provider", str, path, "precision.") != data.get("provider"):
        raise _bad(path, f"precision.provider {sec['provider']!r} is not the profile's provider "
                         f"{data.get('provider')!r}")
    threads = (data.get("settings") or {}).get("threads")
    if _get(sec, "threads", int, path, "precision.") != threads:
        raise _bad(path, f"precision.threads {sec['threads']} is not the profile's threads {threads}")
    for key in ("fp32_ms", "int8_all_ms", "chosen_ms"):
        if _get(sec, key, _NUM, path, "precision.") <= 0:
            raise _bad(path, f"precision.{key} must be a positive number of milliseconds")
    names = {v["name"] for v in layers}
    for name, v in _get(sec, "layers", dict, path, "precision.").items():
        where = f"precision.layers[{name!r}]."
        if name not in names:
            raise _bad(path, f"precision.layers names {name!r}, not a compute layer of this profile's model")
        _get(v, "int8", bool, path, where)
        _get(v, "saving_ms", _NUM, path, where)
        if _get(v, "noise_ms", _NUM, path, where) < 0:
            raise _bad(path, f"{where}noise_ms must be ≥ 0")
        _get(v, "reason", str, path, where)
    for k, s in enumerate(_get(sec, "samples", list, path, "precision.")):
        widths = _get(s, "widths", list, path, f"precision.samples[{k}].")
        if len(widths) != len(data["variables"]) or not all(isinstance(w, int) and w > 0 for w in widths):
            raise _bad(path, f"precision.samples[{k}].widths must list {len(data['variables'])} positive integers")
        for key in ("fp32_ms", "int8_ms"):
            if _get(s, key, _NUM, path, f"precision.samples[{k}].") <= 0:
                raise _bad(path, f"precision.samples[{k}].{key} must be a positive number of milliseconds")
    return sec


def check_model(profile: Profile, fp: str, path) -> None:
    if profile.fingerprint != fp:
        raise UserError(f"profile {path} was measured on a different model structure (fingerprint "
                        f"{profile.fingerprint[:12]}…, this model {fp[:12]}…{_from(profile)}): profile this model "
                        "with `onnxecc profile`")


def _from(profile: Profile) -> str:
    return f", profile made from {profile.source}" if profile.source else ""
