"""A known accelerator: its description file and the analytic energy model of a systolic array.

ONNX side: numpy and onnx only (no torch), so `onnxecc inspect --hardware` runs anywhere.

The description file (JSON, see `profiles/eyeriss.json`)::

    {"name": "eyeriss",
     "pe_array": {"rows": 12, "cols": 14},          # m rows, n columns of processing elements
     "input_cache": 51200, "weight_cache": 4096,     # capacities in values (s_i, s_w)
     "unit_energy": {"mac": 3, "rf": 1, "cache": 6, "dram": 200},
     "reference_bits": 16,                           # data width of unit_energy and of the capacities (default 16)
     "unit_energy_by_bits": {"8": {"mac": 0.9, "rf": 0.5, "cache": 3, "dram": 100}},  # optional, other widths
     "energy_unit": "pJ"}                            # what one unit of `unit_energy` is (default pJ)

Bit widths. `unit_energy` is the energy at `reference_bits`; `unit_energy_by_bits` (optional) gives the unit
energies of other data widths (keys: the width in bits as a string). A layer run at b bits uses that width's
energies, and the caches, whose capacities are given in reference-width values, hold ⌊s·reference_bits/b⌋
values of b bits (a cache of 4,096 16-bit values holds 8,192 8-bit values): the DRAM terms depend on them.
`Hardware.at_bits(b)` is the accelerator seen by a b-bit layer; every energy function below takes that.
A model's layers may run at different widths (`model_energy(..., bits=)`; a QDQ file's int8 layers are read
as 8-bit, `dequantized`). The whole layer — weights, inputs, MACs, output writes — is at its width.

Energy model, per compute layer (Conv with 1 or 2 spatial dims, Gemm, MatMul by a constant), batch 1.
Notation: P output positions (h'w' for a conv, the rows of A for Gemm/MatMul), d output channels, g groups,
d_g = d/g output channels that read each input, T = ⌈P/m⌉ row tiles, R = ⌈d_g/n⌉ column tiles;
nnz(W) non-zero weights; X non-zero input elements (the input mask's support; the whole input without a
mask); U the non-zero entries of the layer's im2col matrix (input element × output position pairs, padding
excluded; U = X for Gemm/MatMul); N_mac the MACs whose weight *and* input are non-zero.

* E_compute = e_MAC · N_mac
* E_weights = e_cache·T·nnz(W) + e_RF·P·nnz(W) + e_DRAM·[min(s_w, nnz(W)) + T·max(0, nnz(W) − s_w)]
  (each weight is fetched from the cache once per row tile and read from its RF once per output position;
  weights beyond the weight cache are re-fetched from DRAM for every row tile)
* E_inputs = e_cache·R·U + e_RF·d_g·U + e_DRAM·[min(s_i, X) + R·max(0, X − s_i)] + e_DRAM·d·P
  (each im2col entry is fetched from the cache once per column tile and read from an RF by each of the d_g
  output channels; inputs beyond the input cache are re-fetched from DRAM per column tile; the last term
  writes the outputs to DRAM)

Only the input masks (a `Mul` by a constant in front of a conv) make inputs zero in this model; zeros
produced at run time (ReLU) are data-dependent and are not counted. ConvTranspose and 3-D convs are not
modelled (a `UserError` says so).

For the weighted sparse projection the energy is relaxed into a per-weight cost c_j (energy weight j adds
when it is non-zero, input masks fixed): e_MAC·(non-zero inputs it meets) + e_cache·T + e_RF·P + e_DRAM·δ_j,
where δ_j = 1 for a layer's s_w highest-scoring weights and T for the others. Σ c_j·[W_j ≠ 0] + E_inputs is
an upper bound of the exact energy (equal when a layer keeps no weight outside its top s_w), so a projection
that meets the budget in the relaxed model meets it exactly. Input mask elements get the symmetric cost.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxecc.core.errors import UserError
from onnxecc.graph.graph import Graph
from onnxecc.graph.layers import find_layers, tensor_shapes, with_static_shapes

ENERGY_UNITS = {"fJ": 1e-15, "pJ": 1e-12, "nJ": 1e-9, "uJ": 1e-6, "µJ": 1e-6, "mJ": 1e-3, "J": 1.0}
_TOP_KEYS = {"name", "description", "note", "source", "pe_array", "input_cache", "weight_cache", "unit_energy",
             "energy_unit", "reference_bits", "unit_energy_by_bits"}
_UNIT_KEYS = ("mac", "rf", "cache", "dram")


# ---------------------------------------------------------------------------------------------- description
@dataclass(frozen=True)
class Hardware:
    """A systolic-array accelerator. Unit energies are in `energy_unit` (joules_per_unit J each)."""

    name: str
    rows: int
    cols: int
    input_cache: int
    weight_cache: int
    e_mac: float
    e_rf: float
    e_cache: float
    e_dram: float
    energy_unit: str = "pJ"
    sha256: str = ""
    source: str = ""
    bits: int = 16  # the data width the fields above describe (the file's reference_bits, or `at_bits`)
    by_bits: tuple = ()  # ((bits, (mac, rf, cache, dram)), ...) for every width the file gives, sorted
    reference_bits: int = 16  # the width the file's capacities are counted in …
    reference_caches: tuple = ()  # … and those capacities (input, weight); () : the fields above

    @property
    def joules_per_unit(self) -> float:
        return ENERGY_UNITS[self.energy_unit]

    @property
    def widths(self) -> tuple[int, ...]:
        """The data widths this accelerator has unit energies for."""
        return tuple(b for b, _ in self.by_bits) or (self.bits,)

    def at_bits(self, bits: int | None) -> Hardware:
        """The accelerator as a `bits`-wide layer sees it: that width's unit energies, and caches holding
        ⌊capacity·reference_bits/bits⌋ values (None: unchanged). UserError for a width the file lacks."""
        if bits is None or bits == self.bits:
            return self
        table = dict(self.by_bits)
        if bits not in table:
            raise UserError(f"{self.source or self.name}: no unit energies for {bits}-bit data (it has "
                            f"{', '.join(f'{b}-bit' for b in self.widths)}): add \"unit_energy_by_bits\": "
                            f"{{\"{bits}\": {{\"mac\": …, \"rf\": …, \"cache\": …, \"dram\": …}}}}")
        mac, rf, cache, dram = table[bits]
        s_i, s_w = self.reference_caches or (self.input_cache, self.weight_cache)
        scale = lambda cap: max(1, cap * self.reference_bits // bits)  # noqa: E731
        return replace(self, bits=bits, e_mac=mac, e_rf=rf, e_cache=cache, e_dram=dram, input_cache=scale(s_i),
                       weight_cache=scale(s_w), reference_caches=(s_i, s_w))

    def as_dict(self) -> dict:
        out = {"name": self.name, "pe_array": {"rows": self.rows, "cols": self.cols},
               "input_cache": self.input_cache, "weight_cache": self.weight_cache,
               "unit_energy": {"mac": self.e_mac, "rf": self.e_rf, "cache": self.e_cache, "dram": self.e_dram},
               "energy_unit": self.energy_unit, "sha256": self.sha256, "source": self.source}
        if len(self.by_bits) > 1 or self.bits != 16:
            out["reference_bits"] = self.bits
            out["unit_energy_by_bits"] = {str(b): dict(zip(_UNIT_KEYS, e)) for b, e in self.by_bits}
        return out


def load_hardware(path: str | os.PathLike) -> Hardware:
    """Read and validate a description file; every problem is a one-line `UserError`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"hardware file not found: {p} — pass e.g. --hardware profiles/eyeriss.json")
    if p.is_dir():
        raise UserError(f"hardware path {p} is a directory: pass a JSON file such as profiles/eyeriss.json")
    data = p.read_bytes()
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{p} is not a text JSON file: write the accelerator description as JSON") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    return parse_hardware(obj, str(p), hashlib.sha256(data).hexdigest())


def parse_hardware(obj, source: str = "<hardware>", sha256: str = "") -> Hardware:
    """Validate a parsed description (a dict) into a `Hardware`."""
    if not isinstance(obj, dict):
        raise UserError(f"{source}: the description must be a JSON object with pe_array, input_cache, "
                        "weight_cache and unit_energy")
    unknown = sorted(set(obj) - _TOP_KEYS)
    if unknown:
        raise UserError(f"{source}: unknown key '{unknown[0]}' (expected {', '.join(sorted(_TOP_KEYS))})")
    for key in ("pe_array", "input_cache", "weight_cache", "unit_energy"):
        if key not in obj:
            raise UserError(f"{source}: missing '{key}' (see profiles/eyeriss.json for the format)")
    pe = obj["pe_array"]
    if not isinstance(pe, dict) or set(pe) != {"rows", "cols"}:
        raise UserError(f"{source}: 'pe_array' must be an object {{\"rows\": m, \"cols\": n}}")
    rows = _positive_int(pe["rows"], "pe_array.rows", source)
    cols = _positive_int(pe["cols"], "pe_array.cols", source)
    s_i = _positive_int(obj["input_cache"], "input_cache", source)
    s_w = _positive_int(obj["weight_cache"], "weight_cache", source)
    energies = _unit_energies(obj["unit_energy"], "unit_energy", source)
    ref = _positive_int(obj.get("reference_bits", 16), "reference_bits", source)
    if ref > 64:
        raise UserError(f"{source}: 'reference_bits' must be at most 64, got {ref}")
    table = {ref: tuple(energies[k] for k in _UNIT_KEYS)}
    by_bits = obj.get("unit_energy_by_bits", {})
    if not isinstance(by_bits, dict):
        raise UserError(f"{source}: 'unit_energy_by_bits' must be an object such as "
                        "{\"8\": {\"mac\": 0.9, \"rf\": 0.5, \"cache\": 3, \"dram\": 100}}")
    for key, ue in by_bits.items():
        if not (isinstance(key, str) and key.isdigit() and 1 <= int(key) <= 64):
            raise UserError(f"{source}: unit_energy_by_bits key {key!r} is not a bit width (an integer 1–64 as a "
                            "string, e.g. \"8\")")
        e = _unit_energies(ue, f"unit_energy_by_bits.{key}", source)
        if int(key) == ref and tuple(e[k] for k in _UNIT_KEYS) != table[ref]:
            raise UserError(f"{source}: unit_energy_by_bits.{key} differs from unit_energy, which is the "
                            f"{ref}-bit (reference_bits) entry: give it once")
        table[int(key)] = tuple(e[k] for k in _UNIT_KEYS)
    unit = obj.get("energy_unit", "pJ")
    if unit not in ENERGY_UNITS:
        raise UserError(f"{source}: energy_unit {unit!r} is not one of {', '.join(ENERGY_UNITS)}")
    name = obj.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise UserError(f"{source}: 'name' must be a string")
    return Hardware(name, rows, cols, s_i, s_w, energies["mac"], energies["rf"], energies["cache"],
                    energies["dram"], unit, sha256, source, ref, tuple(sorted(table.items())), ref, (s_i, s_w))


def _unit_energies(ue, key: str, source: str) -> dict[str, float]:
    """One {mac, rf, cache, dram} object, validated (one-line UserErrors naming `key`)."""
    if not isinstance(ue, dict):
        raise UserError(f"{source}: '{key}' must be an object with {', '.join(_UNIT_KEYS)}")
    extra = sorted(set(ue) - set(_UNIT_KEYS))
    if extra:
        raise UserError(f"{source}: unknown unit energy '{extra[0]}' in {key} (expected {', '.join(_UNIT_KEYS)})")
    missing = [k for k in _UNIT_KEYS if k not in ue]
    if missing:
        raise UserError(f"{source}: {key} lacks '{missing[0]}' (give mac, rf, cache and dram)")
    energies = {k: _nonnegative(ue[k], f"{key}.{k}", source) for k in _UNIT_KEYS}
    if energies["rf"] + energies["cache"] <= 0:
        raise UserError(f"{source}: {key}.rf and {key}.cache cannot both be 0 (every weight "
                        "would be free to keep)")
    return energies


def _positive_int(value, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        raise UserError(f"{source}: '{key}' must be a positive integer, got {json.dumps(value)}")
    return int(value)


def _nonnegative(value, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{source}: '{key}' must be a non-negative number, got {json.dumps(value)}")
    return float(value)


# ------------------------------------------------------------------------------------------------- geometry
@dataclass
class LayerGeometry:
    """What the energy model needs of one compute layer (batch 1). Arrays are in the ONNX weight layout."""

    name: str
    op: str  # Conv | Gemm | MatMul
    weight: str  # weight tensor name (as the node uses it)
    input: str  # input tensor name (before any mask Mul this module finds)
    weight_shape: tuple[int, ...]
    positions: int  # P
    out_channels: int  # d
    groups: int = 1
    in_shape: tuple[int, ...] = ()  # conv: (c, h, w); Gemm/MatMul: (P·K,)
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int] = (0, 0)  # top, left
    out_hw: tuple[int, int] = (1, 1)
    gemm_trans_b: bool = False  # Gemm weight stored as (N, K)
    node_index: int = -1
    _counts: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_conv(self) -> bool:
        return self.op == "Conv"

    @property
    def d_g(self) -> int:
        return self.out_channels // self.groups

    @property
    def input_size(self) -> int:
        return int(np.prod(self.in_shape))

    @property
    def weight_size(self) -> int:
        return int(np.prod(self.weight_shape))

    def as_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "weight": self.weight, "weight_shape": list(self.weight_shape),
                "positions": self.positions, "out_channels": self.out_channels, "groups": self.groups,
                "in_shape": list(self.in_shape), "kernel": list(self.kernel), "strides": list(self.strides),
                "pads": list(self.pads), "dilations": list(self.dilations)}

    # -- mask-dependent counts -------------------------------------------------------------------------
    def input_uses(self, mask: np.ndarray | None) -> np.ndarray:
        """cnt[ci, a, b]: non-zero inputs that a weight of input channel ci at kernel offset (a, b) meets over
        all output positions (conv), or P per input feature (Gemm/MatMul: shape (K, 1, 1))."""
        if not self.is_conv:
            k = self.weight_shape[0] if self.op == "MatMul" or not self.gemm_trans_b else self.weight_shape[1]
            if mask is not None:
                raise ValueError("input masks are modelled for Conv layers only")
            return np.full((k, 1, 1), self.positions, dtype=np.int64)
        key = None if mask is None else hashlib.sha1(np.packbits(mask.astype(bool)).tobytes()).hexdigest()
        if key in self._counts:
            return self._counts[key]
        padded = self._padded(mask)
        kh, kw = self.kernel
        (sh, sw), (dh, dw), (oh, ow) = self.strides, self.dilations, self.out_hw
        cnt = np.empty((self.in_shape[0], kh, kw), dtype=np.int64)
        for a in range(kh):
            for b in range(kw):
                window = padded[:, a * dh: a * dh + (oh - 1) * sh + 1: sh, b * dw: b * dw + (ow - 1) * sw + 1: sw]
                cnt[:, a, b] = window.sum(axis=(1, 2))
        if len(self._counts) > 8:
            self._counts.clear()
        self._counts[key] = cnt
        return cnt

    def _padded(self, mask: np.ndarray | None) -> np.ndarray:
        c, h, w = self.in_shape
        kh, kw = self.kernel
        (sh, sw), (dh, dw), (oh, ow), (pt, pl) = self.strides, self.dilations, self.out_hw, self.pads
        need_h = max(h + pt, (oh - 1) * sh + (kh - 1) * dh + 1)
        need_w = max(w + pl, (ow - 1) * sw + (kw - 1) * dw + 1)
        padded = np.zeros((c, need_h, need_w), dtype=np.int64)
        padded[:, pt:pt + h, pl:pl + w] = 1 if mask is None else np.asarray(mask, dtype=bool).reshape(c, h, w)
        return padded

    def weight_uses(self, mask: np.ndarray | None) -> np.ndarray:
        """For every weight (ONNX layout): the non-zero inputs it meets, i.e. its MACs with a non-zero input."""
        cnt = self.input_uses(mask)
        if not self.is_conv:
            per_k = cnt[:, 0, 0]
            if self.op == "Gemm" and self.gemm_trans_b:
                return np.broadcast_to(per_k[None, :], self.weight_shape)
            return np.broadcast_to(per_k[:, None], self.weight_shape)
        g, cg = self.groups, self.weight_shape[1]
        per_group = cnt.reshape(g, cg, *self.kernel)
        return np.repeat(per_group, self.d_g, axis=0).reshape(self.weight_shape)

    def element_uses(self, weight_support: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """For every input element (c, h, w) of a conv: (u, macs) = the output positions × kernel offsets it
        feeds (im2col entries) and the MACs it takes part in with the given weight support."""
        assert self.is_conv
        c, h, w = self.in_shape
        kh, kw = self.kernel
        (sh, sw), (dh, dw), (oh, ow), (pt, pl) = self.strides, self.dilations, self.out_hw, self.pads
        support = np.ones(self.weight_shape, dtype=bool) if weight_support is None else \
            np.asarray(weight_support).reshape(self.weight_shape) != 0
        # nz[ci, a, b]: output channels (of ci's group) whose weight at (ci, a, b) is non-zero
        nz = support.reshape(self.groups, self.d_g, self.weight_shape[1], kh, kw).sum(axis=1)
        nz = nz.reshape(c, kh, kw).astype(np.int64)
        need_h = max(h + pt, (oh - 1) * sh + (kh - 1) * dh + 1)
        need_w = max(w + pl, (ow - 1) * sw + (kw - 1) * dw + 1)
        uses = np.zeros((need_h, need_w), dtype=np.int64)
        macs = np.zeros((c, need_h, need_w), dtype=np.int64)
        for a in range(kh):
            for b in range(kw):
                rows = slice(a * dh, a * dh + (oh - 1) * sh + 1, sh)
                cols = slice(b * dw, b * dw + (ow - 1) * sw + 1, sw)
                uses[rows, cols] += 1
                macs[:, rows, cols] += nz[:, a, b, None, None]
        u = np.broadcast_to(uses[pt:pt + h, pl:pl + w], (c, h, w))
        return u, macs[:, pt:pt + h, pl:pl + w]


def tiles(geom: LayerGeometry, hw: Hardware) -> tuple[int, int]:
    """(T, R): row tiles ⌈P/m⌉ and column tiles ⌈d_g/n⌉."""
    return -(-geom.positions // hw.rows), -(-geom.d_g // hw.cols)


# ------------------------------------------------------------------------------------------------- energies
@dataclass
class LayerEnergy:
    """One layer's modelled energy, in the hardware's units."""

    name: str
    op: str
    compute: float
    weights: float
    inputs: float
    nnz_weights: int
    weight_size: int
    nnz_inputs: int
    input_size: int
    macs_nonzero: int
    bits: int = 16  # the data width the layer was counted at

    @property
    def total(self) -> float:
        return self.compute + self.weights + self.inputs

    def as_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "compute": self.compute, "weights": self.weights,
                "inputs": self.inputs, "total": self.total, "nnz_weights": self.nnz_weights,
                "weight_size": self.weight_size, "nnz_inputs": self.nnz_inputs, "input_size": self.input_size,
                "macs_nonzero": self.macs_nonzero, "bits": self.bits}


def weights_energy(geom: LayerGeometry, hw: Hardware, nnz: int) -> float:
    t, _ = tiles(geom, hw)
    return (hw.e_cache * t * nnz + hw.e_rf * geom.positions * nnz
            + hw.e_dram * (min(hw.weight_cache, nnz) + t * max(0, nnz - hw.weight_cache)))


def inputs_energy(geom: LayerGeometry, hw: Hardware, mask: np.ndarray | None) -> tuple[float, int, int]:
    """(E_inputs, X, U) for the given input mask (None: every input element is non-zero)."""
    _, r = tiles(geom, hw)
    x = geom.input_size if mask is None else int(np.count_nonzero(mask))
    u = int(geom.input_uses(mask).sum()) if geom.is_conv else x
    energy = (hw.e_cache * r * u + hw.e_rf * geom.d_g * u
              + hw.e_dram * (min(hw.input_cache, x) + r * max(0, x - hw.input_cache))
              + hw.e_dram * geom.out_channels * geom.positions)
    return float(energy), x, u


def layer_energy(geom: LayerGeometry, hw: Hardware, weight: np.ndarray | None = None,
                 mask: np.ndarray | None = None, bits: int | None = None) -> LayerEnergy:
    """Energy of one layer given its weight values or support (ONNX layout; None: dense) and input mask, at
    `bits` (None: `hw`'s own width; see `Hardware.at_bits`)."""
    hw = hw.at_bits(bits)
    if weight is None:
        support = np.ones(geom.weight_shape, dtype=bool)
    else:
        support = np.asarray(weight).reshape(geom.weight_shape) != 0
    nnz = int(np.count_nonzero(support))
    macs = int(geom.weight_uses(mask)[support].sum())
    e_in, x, _ = inputs_energy(geom, hw, mask)
    return LayerEnergy(geom.name, geom.op, hw.e_mac * macs, float(weights_energy(geom, hw, nnz)), e_in, nnz,
                       geom.weight_size, x, geom.input_size, macs, hw.bits)


def weight_costs(geom: LayerGeometry, hw: Hardware, mask: np.ndarray | None = None,
                 score: np.ndarray | None = None) -> np.ndarray:
    """Relaxed per-weight cost c_j (ONNX layout, float64): the energy weight j adds when it is non-zero.

    The DRAM part is e_DRAM for the layer's `weight_cache` highest-`score` weights and T·e_DRAM for the rest
    (without a score, every weight beyond the cache pays T·e_DRAM when the layer does not fit)."""
    t, _ = tiles(geom, hw)
    base = hw.e_cache * t + hw.e_rf * geom.positions
    cost = hw.e_mac * geom.weight_uses(mask).astype(np.float64) + base + hw.e_dram * t
    size = geom.weight_size
    if size <= hw.weight_cache:
        cost = cost - hw.e_dram * (t - 1)
    elif t > 1:
        flat = cost.reshape(-1).copy()
        if score is None:
            flat[: hw.weight_cache] -= hw.e_dram * (t - 1)
        else:
            top = np.argpartition(-np.asarray(score, dtype=np.float64).reshape(-1), hw.weight_cache - 1)
            flat[top[: hw.weight_cache]] -= hw.e_dram * (t - 1)
        cost = flat.reshape(geom.weight_shape)
    return np.ascontiguousarray(cost, dtype=np.float64)


def mask_costs(geom: LayerGeometry, hw: Hardware, weight: np.ndarray | None = None,
               score: np.ndarray | None = None) -> np.ndarray:
    """Relaxed per-input-element cost (c, h, w) of a conv's input mask, weights fixed: the energy element x
    adds when it is kept — its MACs, its cache/RF reads, its DRAM read (R·e_DRAM beyond the input cache,
    assigned to the lowest-`score` elements)."""
    _, r = tiles(geom, hw)
    u, macs = geom.element_uses(weight)
    cost = hw.e_mac * macs + (hw.e_cache * r + hw.e_rf * geom.d_g) * u + hw.e_dram * r
    cost = cost.astype(np.float64)
    if geom.input_size <= hw.input_cache:
        cost -= hw.e_dram * (r - 1)
    elif r > 1:
        flat = cost.reshape(-1)
        if score is None:
            flat[: hw.input_cache] -= hw.e_dram * (r - 1)
        else:
            top = np.argpartition(-np.asarray(score, dtype=np.float64).reshape(-1), hw.input_cache - 1)
            flat[top[: hw.input_cache]] -= hw.e_dram * (r - 1)
    return cost


def min_support_energy(geom: LayerGeometry, hw: Hardware, k_weights: int, k_inputs: int) -> tuple[float, float]:
    """Upper bounds of what a layer's minimum support adds to its floor (every weight zero, every conv input
    masked): (inputs: any `k_inputs` conv input elements kept — the bound keeps the k with the most im2col
    uses; 0 for Gemm/MatMul, whose inputs are not masked), (weights: any `k_weights` weights at their relaxed
    cost `weight_costs` under any input mask — the bound takes the k costliest with every input non-zero and
    no weight-cache discount beyond the cache). The exact energy of any such support is at most their sum."""
    inputs = 0.0
    if geom.is_conv:
        k = min(max(0, int(k_inputs)), geom.input_size)
        uses = geom.element_uses(None)[0].reshape(-1)
        mask = np.zeros(geom.input_size, dtype=bool)
        mask[np.argsort(-uses, kind="stable")[:k]] = True
        empty = np.zeros(geom.in_shape, dtype=bool)
        inputs = inputs_energy(geom, hw, mask.reshape(geom.in_shape))[0] - inputs_energy(geom, hw, empty)[0]
    t, _ = tiles(geom, hw)
    dram = hw.e_dram * (1 if geom.weight_size <= hw.weight_cache else t)
    cost = hw.e_mac * geom.weight_uses(None).astype(np.float64).reshape(-1) + hw.e_cache * t \
        + hw.e_rf * geom.positions + dram
    k = min(max(0, int(k_weights)), geom.weight_size)
    weights = float(np.sort(cost)[::-1][:k].sum())
    return float(inputs), weights


def mask_fixed_energy(geom: LayerGeometry, hw: Hardware, weight: np.ndarray | None = None) -> float:
    """The part of a conv's energy that no input element changes: its weight accesses and output writes."""
    nnz = geom.weight_size if weight is None else int(np.count_nonzero(weight))
    return float(weights_energy(geom, hw, nnz) + hw.e_dram * geom.out_channels * geom.positions)


# --------------------------------------------------------------------------------------------- whole models
@dataclass
class ModelEnergy:
    """The modelled energy of a model on a hardware: per layer and total (units and joules)."""

    hardware: Hardware
    layers: list[LayerEnergy]

    @property
    def total(self) -> float:
        return float(sum(layer.total for layer in self.layers))

    @property
    def joules(self) -> float:
        return self.total * self.hardware.joules_per_unit

    def as_dict(self) -> dict:
        return {"hardware": self.hardware.name, "hardware_sha256": self.hardware.sha256,
                "energy_unit": self.hardware.energy_unit, "total": self.total, "joules": self.joules,
                "compute": sum(x.compute for x in self.layers), "weights": sum(x.weights for x in self.layers),
                "inputs": sum(x.inputs for x in self.layers), "layers": [x.as_dict() for x in self.layers]}


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose sparse initializers are ordinary dense initializers (for analysis)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not len(out.graph.sparse_initializer):
        return out
    for sparse in out.graph.sparse_initializer:
        out.graph.initializer.append(numpy_helper.from_array(sparse_to_dense(sparse), sparse.values.name))
    del out.graph.sparse_initializer[:]
    return out


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    if values.size:
        idx = numpy_helper.to_array(sparse.indices).astype(np.int64)
        if idx.ndim == 2:
            idx = np.ravel_multi_index(tuple(idx.T), dims)
        dense[idx] = values
    return dense.reshape(dims)


def geometries(model: onnx.ModelProto, shaped: onnx.ModelProto | None = None) -> list[LayerGeometry]:
    """The compute layers of `model` with what the energy model needs (dense initializers expected)."""
    shaped = shaped if shaped is not None else with_static_shapes(model)
    shapes = tensor_shapes(shaped)
    g = Graph(shaped)
    out = []
    for layer in find_layers(model, shaped):
        if layer.weight is None:  # a product of two computed tensors: the array model streams a stationary weight
            continue
        node = shaped.graph.node[layer.node_index]
        w = g.const(layer.weight)
        if layer.op == "ConvTranspose" or (layer.op == "Conv" and w.ndim not in (3, 4)):
            raise UserError(f"{layer.op} '{layer.name}' ({w.ndim - 2}-D) is not modelled by the systolic-array "
                            "energy model (Conv 1-D/2-D, Gemm and MatMul are)")
        if layer.op == "Conv":
            out.append(_conv_geometry(layer, node, w.shape, shapes))
        else:
            positions = layer.macs // max(1, layer.cin * layer.cout)
            trans_b = layer.op == "Gemm" and bool(_attr(node, "transB", 0))
            out.append(LayerGeometry(layer.name, layer.op, layer.weight, node.input[0], tuple(w.shape), positions,
                                     layer.cout, 1, (positions * layer.cin,), gemm_trans_b=trans_b,
                                     node_index=layer.node_index))
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _conv_geometry(layer, node: onnx.NodeProto, wshape, shapes) -> LayerGeometry:
    in_shape = shapes[node.input[0]][1:]
    out_shape = shapes[node.output[0]][2:]
    one_d = len(wshape) == 3
    if one_d:
        in_shape = (in_shape[0], 1, in_shape[1])
        out_shape = (1, out_shape[0])
    c, h, w = (int(v) for v in in_shape)
    kernel = (1, int(wshape[2])) if one_d else (int(wshape[2]), int(wshape[3]))
    strides = [int(s) for s in _attr(node, "strides", [1] * (len(wshape) - 2))]
    dilations = [int(s) for s in _attr(node, "dilations", [1] * (len(wshape) - 2))]
    if one_d:
        strides, dilations = [1, strides[0]], [1, dilations[0]]
    oh, ow = int(out_shape[0]), int(out_shape[1])
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, dil, o in ((h, kernel[0], strides[0], dilations[0], oh),
                                   (w, kernel[1], strides[1], dilations[1], ow)):
            total = max(0, (o - 1) * s + (k - 1) * dil + 1 - size)
            pads.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        top, left = pads
    elif auto_pad == "VALID":
        top = left = 0
    else:
        p = [int(v) for v in _attr(node, "pads", [0] * (2 * (len(wshape) - 2)))]
        top, left = (0, p[0]) if one_d else (p[0], p[1])
    return LayerGeometry(layer.name, "Conv", layer.weight, node.input[0], tuple(int(v) for v in wshape), oh * ow,
                         int(wshape[0]), layer.groups, (c, h, w), kernel, (strides[0], strides[1]),
                         (dilations[0], dilations[1]), (top, left), (oh, ow), node_index=layer.node_index)


def input_masks(model: onnx.ModelProto, geoms: list[LayerGeometry]) -> dict[str, np.ndarray]:
    """Input supports of convs fed by a `Mul` with a constant operand: zeros of the constant zero the input.

    Returns layer name → boolean (c, h, w) array, only for layers whose support is not full."""
    g = Graph(model)
    out = {}
    for geom in geoms:
        if not geom.is_conv:
            continue
        producer = g.producer.get(geom.input)
        if producer is None or producer.op_type != "Mul" or producer.domain not in ("", "ai.onnx"):
            continue
        consts = [g.const(i) for i in producer.input]
        if sum(v is not None for v in consts) != 1:
            continue
        const = next(v for v in consts if v is not None)
        c, h, w = geom.in_shape
        full = (1, c, h, w) if len(geom.weight_shape) == 4 else (1, c, w)
        try:
            support = np.broadcast_to(np.asarray(const) != 0, full).reshape(c, h, w)
        except ValueError:
            continue
        if not support.all():
            out[geom.name] = support.copy()
    return out


def model_energy(model: onnx.ModelProto, hw: Hardware, bits: int | dict[str, int] | None = None) -> ModelEnergy:
    """Count the modelled energy of an ONNX model from the file itself: weight supports from its
    (dense or sparse) initializers, input supports from `Mul`-by-constant masks in front of convs, and each
    layer's data width from the file (`dequantized`: int8 QDQ layers are 8-bit, the others `hw.bits`).
    `bits` overrides it: one width for every layer, or layer name → width."""
    dense, file_bits = dequantized(densify(model))
    geoms = geometries(dense)
    masks = input_masks(dense, geoms)
    g = Graph(dense)
    widths = {geom.name: file_bits.get(geom.weight, hw.bits) for geom in geoms}
    if isinstance(bits, int):
        widths = dict.fromkeys(widths, bits)
    elif bits:
        widths.update(bits)
    layers = [layer_energy(geom, hw, g.const(geom.weight), masks.get(geom.name), widths[geom.name])
              for geom in geoms]
    return ModelEnergy(hw, layers)


def energy_summary(model: onnx.ModelProto, hw: Hardware) -> dict:
    """`model_energy(model, hw).as_dict()` plus, under "at_bits", the total and per-layer energy with every
    layer at each width the hardware file gives, except the one every layer already has (for `onnxecc inspect
    --hardware`: a float model at 8 bits, a QDQ model at 16 bits)."""
    own = model_energy(model, hw)
    out = own.as_dict()
    out["at_bits"] = {}
    for b in (b for b in hw.widths if {x.bits for x in own.layers} != {b}):
        e = model_energy(model, hw, bits=b)
        out["at_bits"][str(b)] = {"total": e.total, "joules": e.joules,
                                  "layers": {x.name: x.total for x in e.layers}}
    return out


_INT_BITS = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT16: 16,
             onnx.TensorProto.UINT16: 16, onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}


def dequantized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A QDQ model read as the float model the accelerator runs at low width: every DequantizeLinear of a
    constant integer tensor becomes a float initializer ((q − zero_point)·scale, so a weight stored as 0 stays
    an exact 0) and activation QuantizeLinear → DequantizeLinear pairs are bypassed (so a mask `Mul` in front
    of a conv is found again). Returns (model, {dequantized tensor name: bits of its integer type}); the model
    unchanged and {} when it has no DequantizeLinear."""
    graph = model.graph
    if not any(n.op_type == "DequantizeLinear" for n in graph.node):
        return model, {}
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    new_inits, alias, drop, bits = [], {}, set(), {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        q = node.input[0]
        if q in inits and all(i in inits for i in node.input[1:] if i):
            value = numpy_helper.to_array(inits[q]).astype(np.float64)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) \
                if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
            if scale.ndim == 1 and scale.size > 1:  # per-axis
                axis = _attr(node, "axis", 1) % value.ndim
                shape = [1] * value.ndim
                shape[axis] = scale.size
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            new_inits.append(numpy_helper.from_array(((value - zp) * scale).astype(np.float32), node.output[0]))
            bits[node.output[0]] = _INT_BITS.get(inits[q].data_type, 32)
            drop.add(id(node))
        elif q in producer and producer[q].op_type == "QuantizeLinear" and node.output[0] not in outputs:
            alias[node.output[0]] = producer[q].input[0]
            drop.add(id(node))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [n for n in model.graph.node if id(n) not in drop]
    del out.graph.node[:]
    for n in keep:
        copy = out.graph.node.add()
        copy.CopyFrom(n)
        for i, name in enumerate(copy.input):
            copy.input[i] = alias.get(name, name)
    used = {i for n in out.graph.node for i in n.input} | outputs
    kept = [n for n in out.graph.node if n.op_type != "QuantizeLinear" or any(o in used for o in n.output)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(new_inits)
    used = {i for n in out.graph.node for i in n.input} | outputs
    live = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(live)
    del out.graph.value_info[:]
    return out, bits


def format_energy(units: float, hw: Hardware) -> str:
    """'1.23 uJ (1.23e+06 pJ)'-style text for a modelled energy."""
    from onnxecc.cost.budget import format_cost

    return f"{format_cost(units * hw.joules_per_unit, 'energy')} ({units:.4g} {hw.energy_unit} units)"
