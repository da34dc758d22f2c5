"""ECC offline phase: profile a model on the target and fit the bilinear cost model.

`profile(model, output)` measures variants of `model` with random widths per prunable channel group on an
onnxruntime execution provider (`sampling`), with a meter (`meters`: latency, RAPL, NVML, Jetson rails, an
external command), fits E(w) = b + Σ_l a_l·f_l(w) with non-negative coefficients (`fit`), and writes the
profile JSON (`store`) — atomically after every sample, so an interrupted run resumes where it stopped.
`load_profile(path, model)` reads a profile back and checks it belongs to `model`'s structure;
`profile_cost(...)` turns it into the `BilinearCost` that `compress --metric latency|energy` projects with.

This package runs on the target device: it imports onnx, onnxruntime and numpy only — never torch,
onnx2torch or cvxpy.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxecc.core import atomic
from onnxecc.core.errors import UserError
from onnxecc.cost.costs import BilinearCost, Term, Variables, _merge, layer_costs
from onnxecc.cost.profiler import fit as fitting
from onnxecc.cost.profiler import meters, sampling, store
from onnxecc.cost.profiler.meters import Meter, make_meter
from onnxecc.cost.profiler.store import Fit, Profile, fingerprint, load_profile
from onnxecc.graph import ingest, runtime
from onnxecc.graph.inputs import symbolic

__all__ = ["Profile", "Fit", "profile", "load_profile", "profile_cost", "fingerprint", "make_meter", "Meter",
           "ModelInfo", "measure_pair", "recorded_meter"]

DEFAULT_SAMPLES = 200
DEFAULT_WARMUP = 10
DEFAULT_REPEATS = 30


@dataclass
class ModelInfo:
    """What the profiler needs to know about a model: layers, channel groups, width variables, features."""

    model: onnx.ModelProto
    shaped: onnx.ModelProto
    layers: list
    graph: object
    variables: Variables
    layer_costs: list[BilinearCost]
    features: fitting.Features
    fingerprint: str
    input_shapes: dict = field(default_factory=dict)  # the size measured at (batch first; see `inputs`)

    @classmethod
    def of(cls, model: ingest.ModelSource, input_shapes=None) -> ModelInfo:
        """`input_shapes`: sizes of symbolic input dims (parsed --input-shape; `inputs.resolve_shapes`)."""
        from onnxecc.cost.analysis import analyse

        proto = ingest.load(model)
        a = analyse(proto, "profile", input_shapes)
        costs = layer_costs(a.graph, a.layers, proto, a.variables)
        return cls(proto, a.shaped, a.layers, a.graph, a.variables, costs, _features(a.graph, a.variables, costs),
                   fingerprint(proto), a.input_shapes)


def _features(graph, variables: Variables, costs: list[BilinearCost]) -> fitting.Features:
    prunable_groups = {g.id for g in graph.prunable_groups}
    full = np.array([len(u) for u in variables.units], dtype=np.float64)
    prunable = np.array([g in prunable_groups for g in variables.group], dtype=bool)
    per_unit = variable_channels_per_unit(graph, variables)
    return fitting.Features(costs, full, prunable, [per_unit.get(v, 1) for v in range(len(variables.group))])


def variable_channels_per_unit(graph, variables: Variables) -> dict[int, int]:
    """Channels one unit of each width variable stands for, where not 1 (a head of an attention-head group):
    what `BilinearCost.channels_per_unit` holds, so that a step or --round-to in channels means the same
    head counts to the profiler's sampling and fit as to compress's projection."""
    per_group = sampling.channels_per_unit(graph)
    return {v: per_group[g] for v, g in enumerate(variables.group) if g in per_group}


def _settings(provider, provider_options, meter: Meter, threads, warmup, repeats, seed, min_width, step,
              paired: bool) -> dict:
    settings = {"provider": provider, "provider_options": provider_options or {}, "meter": meter.spec,
                "threads": int(threads), "warmup": int(warmup), "repeats": int(repeats), "seed": int(seed),
                "min_width": int(min_width), "step": int(step), "batch": 1}
    return {**settings, "paired": True} if paired else settings  # absent: profiles from before pairing resume


def profile(model: ingest.ModelSource, output: str | os.PathLike | None = None, *,
            provider: str = "CPUExecutionProvider", provider_options: dict | None = None,
            meter: str | Meter = "latency", samples: int = DEFAULT_SAMPLES, seed: int = 0, threads: int = 1,
            warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS, min_width: int = 1, step: int | str = "auto",
            on_progress: Callable[[int, int, dict], None] | None = None, knobs="width",
            calibration: np.ndarray | None = None, paired: bool = True, input_shapes=None) -> Profile:
    """Measure `samples` width variants of `model` and fit the bilinear model; write the profile to `output`.

    If `output` already holds a profile of the same model structure with the same settings, its samples are
    kept and only the missing ones are measured (resume). `on_progress(done, total, sample)` is called after
    every sample. Widths are sampled on multiples of `step` ("auto": the kernel block of the provider, see
    `sampling.auto_step`; 1: any width) — the bilinear model is accurate on that grid, so compress with
    `--round-to` equal to it.

    `paired` (default): each variant is timed in rounds alternating with the full model, and its value is the
    median of the per-round ratios times the full model's median over the whole profile (`_measure_paired`): a
    machine whose speed changes for seconds at a time (a shared VM, a phone's DVFS) then moves the ratio, not
    the level of whichever samples fell into a slow spell. Twice the measuring time.

    `knobs="width,precision"`: also measure int8 per layer (`precision_section`; latency meter only), stored in
    the profile's `precision` section for `compress --knobs width,precision` (kept when resuming).

    A model with symbolic input sizes is measured at `input_shapes` (parsed --input-shape), recorded in the
    settings: `compress --profile` analyses at that size."""
    from onnxecc.cost.quantize import parse_knobs

    knobs = parse_knobs(knobs)
    if "precision" in knobs and (meter if isinstance(meter, str) else meter.name) != "latency":
        raise UserError("--knobs width,precision measures int8 latency: use it with --meter latency")
    if step == "auto" or step is None:
        step = sampling.auto_step(provider)
    try:
        step = int(step)
    except (TypeError, ValueError):
        raise UserError(f"--step must be a positive integer or auto, not {step!r}") from None
    if samples < 2:
        raise UserError("--samples must be at least 2 (the fit needs measurements to compare)")
    if threads < 1 or warmup < 0 or repeats < 1 or min_width < 1 or step < 1:
        raise UserError("--threads, --repeats, --min-width and --step must be ≥ 1, --warmup ≥ 0")
    if output is not None:
        atomic.check_output_path(output)
        if Path(output).exists():  # a profile never replaces the model it measures (nor its external data)
            atomic.refuse_input(output, [Path(output)], ingest.model_files(model), "-o",
                                "give the profile its own .json path")
    info = ModelInfo.of(model, input_shapes)
    m = make_meter(meter)
    if m.name == "cputime" and threads != 1:
        m.close()
        raise UserError("--meter cputime times the calling thread only: use it with --threads 1")
    try:
        settings = _settings(provider, provider_options, m, threads, warmup, repeats, seed, min_width, step, paired)
        if symbolic(info.model):  # the size measured at (absent for fixed-size models: older profiles resume)
            settings["input_shapes"] = {n: list(v) for n, v in info.input_shapes.items()}
        prof = _start(info, output, m, settings, model)
        measured = {x["index"] for x in prof.samples}
        todo = [s for s in sampling.plan(info.graph, samples, seed, min_width, step) if s.index not in measured]
        done = len(prof.samples)
        total = done + len(todo)
        if on_progress:
            on_progress(done, total, {})
        x, reference = None, None
        if todo:  # the provider checked on the full model before anything is measured, and where its nodes run
            prof.placement = runtime.placement(runtime.session(info.model, provider, threads, provider_options))
        for s in todo:
            t0 = time.perf_counter()
            variant = sampling.build(info.model, info.graph, s)
            sess = runtime.session(variant, provider, threads, provider_options)
            if x is None:
                x = runtime.example_input(sess, batch=1, seed=seed, model=info.model, shapes=info.input_shapes)
            feed = runtime.feed(sess, x)  # every input, at the model's fixed batch size if it has one
            run = lambda sess=sess, feed=feed: sess.run(None, feed)  # noqa: E731
            if paired:
                if reference is None:
                    full = runtime.session(info.model, provider, threads, provider_options)
                    reference = lambda full=full, feed=feed: full.run(None, feed)  # noqa: E731
                meas, tries = _measure_paired(m, reference, run, warmup, repeats)
            else:
                meas, tries = _measure(m, run, warmup, repeats)
                meas = meas.as_dict()
            record = {"index": s.index, "kind": s.kind, "widths": sampling.variable_widths(info.variables, s.keep),
                      **meas, "tries": tries, "seconds": round(time.perf_counter() - t0, 4)}
            prof.samples.append(record)
            prof.samples.sort(key=lambda r: r["index"])
            prof.profiling_s += time.perf_counter() - t0
            done += 1
            if output is not None:
                prof.save(output)
            if on_progress:
                on_progress(done, total, record)
    finally:
        m.close()
    t0 = time.perf_counter()
    if paired:
        on_reference_scale(prof.samples)
    prof.fit = fit_samples(prof, info)
    if "precision" in knobs and prof.precision is None:
        prof.precision = precision_section(info, prof, calibration)
    prof.profiling_s += time.perf_counter() - t0
    if output is not None:
        prof.save(output)
    return prof


PRECISION_SAMPLES = (1, 2, 3)  # the uniform 25/50/75 % anchors: int8 timed at pruned widths too (a few, cheap)


def precision_section(info: ModelInfo, prof: Profile, calibration: np.ndarray | None = None) -> dict:
    """The int8 measurement `compress --knobs width,precision` would make at compress time
    (`onnxecc.cost.quantize.measure_precision`: per-layer marginal savings and the choice, at full width), made here on
    the target once, plus the chosen layers timed in int8 side by side with fp32 at the width anchors
    `PRECISION_SAMPLES` (`samples`: widths per width variable, fp32_ms, int8_ms), from which `onnxecc.cost.precision`
    corrects the int8 cost model at pruned widths. Calibration: `calibration` (N×input), else 32 seeded random
    inputs — the int8 kernels' speed does not depend on the calibrated ranges, and compress calibrates the
    output on its own --data. JSON-able; tied to the model by its fingerprint, provider and threads."""
    from onnxecc.cost import quantize

    provider, threads = prof.provider, int(prof.settings["threads"])
    seed = int(prof.settings.get("seed", 0))
    if calibration is None:
        sess = runtime.session(info.model, provider, threads)
        x = runtime.example_input(sess, batch=32, seed=seed, model=info.model, shapes=info.input_shapes)
        how = f"{len(x)} seeded random inputs (seed {seed})"
    else:
        x = np.ascontiguousarray(calibration, dtype=np.float32)
        how = f"{len(x)} inputs given"
    measured = quantize.measure_precision(info.model, x, provider, threads)
    samples = []
    chosen = set(measured.chosen)
    for index in PRECISION_SAMPLES if chosen else ():
        s = sampling.sample(info.graph, index, seed, int(prof.settings.get("min_width", 1)),
                            int(prof.settings.get("step", 1)))
        variant = quantize.named(sampling.build(info.model, info.graph, s))
        layers = [n for n in quantize.candidates(variant) if n in chosen]
        fp32 = runtime.session(variant, provider, threads)
        int8 = runtime.session(quantize.quantize_layers(variant, x, layers), provider, threads)
        pair = quantize._pair(fp32, int8, x[:1], quantize._repeats(fp32, x[:1]))
        fp32_ms = pair.a.median_s * 1e3
        samples.append({"index": s.index, "kind": s.kind, "widths": sampling.variable_widths(info.variables, s.keep),
                        "fp32_ms": fp32_ms, "int8_ms": pair.ratio * fp32_ms, "int8_layers": len(layers)})
    return {"fingerprint": info.fingerprint, **measured.as_dict(), "calibration": how,
            "machine": store.machine_info(), "samples": samples}


NOISY = 0.1  # a measurement whose IQR exceeds this fraction of its median is taken again
MAX_TRIES = 3


def _measure(m: Meter, run, warmup: int, repeats: int):
    """Measure; while the spread says another process disturbed it, measure again (keep the steadiest)."""
    best = None
    for tries in range(1, MAX_TRIES + 1):
        meas = m.measure(run, warmup if tries == 1 else min(warmup, 2), repeats)
        if best is None or meas.iqr / max(meas.value, 1e-300) < best.iqr / max(best.value, 1e-300):
            best = meas
        if best.value > 0 and best.iqr <= NOISY * best.value:
            break
    return best, tries


PAIR_ROUNDS = 5  # paired profiling: rounds of (full model, variant) per sample


def _measure_paired(m: Meter, reference, run, warmup: int, repeats: int) -> tuple[dict, int]:
    """`run` (a variant) and `reference` (the full model) measured in `PAIR_ROUNDS` alternating rounds of about
    `repeats / PAIR_ROUNDS` runs each; again (as `_measure`) while the per-round ratios spread more than
    `NOISY`. The record's `value` is the ratio times this sample's reference median until `on_reference_scale`
    puts every sample on the profile's common reference."""
    per = max(1, -(-repeats // PAIR_ROUNDS))
    with _shorter_rounds(m):
        return _paired_rounds(m, reference, run, warmup, per)


@contextlib.contextmanager
def _shorter_rounds(m: Meter):
    """A latency meter's shortest span (`min_time_s`) shared among the rounds, so pairing costs twice the time
    of one unpaired measurement, not 2 × `PAIR_ROUNDS` times (energy windows stay: the counter needs them)."""
    span = getattr(m, "min_time_s", None)
    if span is not None:
        m.min_time_s = span / PAIR_ROUNDS
    try:
        yield
    finally:
        if span is not None:
            m.min_time_s = span


def measure_pair(m: Meter, a, b, rounds: int, repeats: int, warmup: int = 2) -> runtime.Pair:
    """`a` and `b` (zero-argument runs of two models) measured with the meter `m` in `rounds` alternating rounds of
    `repeats` measurements each (timed runs, or energy windows), as a `runtime.Pair` of per-round medians: its
    `ratio` is the median of per-round ratios b/a, which a change of the machine's speed or power state between
    rounds does not move. The first round warms each model up with `warmup` runs, later ones with at most 2.
    Used by paired profiling and by compress's closed loop and validate for a measured energy budget."""
    ra, rb = [], []
    for k in range(rounds):
        w = warmup if k == 0 else min(warmup, 2)
        ra.append(m.measure(a, w, repeats).value)
        rb.append(m.measure(b, w, repeats).value)
    return runtime.Pair(ra, rb, repeats)


@contextlib.contextmanager
def recorded_meter(description: dict, without: str):
    """The meter a profile recorded (`meters.reopen`), closed on exit. One that cannot run here (no RAPL counters,
    no NVML, a failing command) is a one-line UserError saying so and `without`: how to go on without the
    measurement. Never a silent fall back to an estimate where a measurement was asked for."""
    spec = description.get("spec") if isinstance(description, dict) else description
    try:
        m = meters.reopen(description)
    except UserError as exc:
        raise UserError(f"the energy meter {spec} cannot run here ({exc}): measure where it runs, or {without}") \
            from exc
    try:
        yield m
    finally:
        m.close()


def _paired_rounds(m: Meter, reference, run, warmup: int, per: int) -> tuple[dict, int]:
    best = None
    for tries in range(1, MAX_TRIES + 1):
        pair = measure_pair(m, reference, run, PAIR_ROUNDS, per, warmup if tries == 1 else min(warmup, 2))
        if best is None or pair.noise < best.noise:
            best = pair
        if best.ratio > 0 and best.noise <= NOISY:
            break
    ref = best.a.median_s
    return {"value": best.ratio * ref, "iqr": best.ratio_iqr * ref, "ratio": best.ratio, "ratio_iqr": best.ratio_iqr,
            "reference": ref, "unpaired_value": best.b.median_s, "repeats": per * PAIR_ROUNDS,
            "rounds": PAIR_ROUNDS}, tries


def on_reference_scale(samples: list[dict]) -> None:
    """Put paired samples on one scale: value = ratio × the median of every sample's reference (the full model,
    timed next to each), so no sample carries the level of the spell it was measured in."""
    paired = [s for s in samples if "ratio" in s]
    if not paired:
        return
    level = float(np.median([s["reference"] for s in paired]))
    for s in paired:
        s["value"], s["iqr"] = s["ratio"] * level, s["ratio_iqr"] * level


def _start(info: ModelInfo, output, m: Meter, settings: dict, source) -> Profile:
    """A new profile, or the one at `output` to resume (same structure and settings)."""
    if output is not None and Path(output).exists():
        old = store.read(output, require_fit=False)
        store.check_model(old, info.fingerprint, output)
        if old.settings != settings:
            diff = sorted(k for k in set(old.settings) | set(settings) if old.settings.get(k) != settings.get(k))
            raise UserError(f"{output} holds a profile measured with other settings ({', '.join(diff)}): use the "
                            "same options to resume it, or another -o to start a new one")
        if old.variables != _variables(info):
            raise UserError(f"{output} holds a profile with other width variables (an onnxecc before #25 stepped "
                            "head counts in heads, not channels): use another -o to start a new one")
        old.fit = None
        return old
    from onnxecc import __version__

    source_name = Path(source).name if isinstance(source, (str, os.PathLike)) else ""
    return Profile(
        fingerprint=info.fingerprint, source=source_name, metric=m.metric, unit=m.unit,
        provider=settings["provider"], provider_options=settings["provider_options"], meter=m.describe(),
        machine=store.machine_info(), settings=settings,
        variables=_variables(info), layers=[{"name": layer.name, "macs": int(layer.macs)} for layer in info.layers],
        tool_version=__version__, path=Path(output) if output is not None else None,
    )


def _variables(info: ModelInfo) -> list[dict]:
    """The profile's `variables` entries: group, units, prunable, and a head's channels where not 1."""
    return [{"group": int(g), "units": int(len(u)), "prunable": bool(p),
             **({"channels_per_unit": int(c)} if c > 1 else {})}
            for g, u, p, c in zip(info.variables.group, info.variables.units, info.features.prunable,
                                  info.features.per_unit)]


def sample_arrays(prof: Profile) -> tuple[np.ndarray, np.ndarray, list[str]]:
    widths = np.array([s["widths"] for s in prof.samples], dtype=np.float64).reshape(len(prof.samples), -1)
    y = np.array([s["value"] for s in prof.samples], dtype=np.float64)
    kinds = [str(s.get("kind", "random")) for s in prof.samples]
    return widths, y, kinds


def fit_samples(prof: Profile, info: ModelInfo, only: fitting.Candidate | None = None) -> Fit:
    """Fit the profile's samples (see `onnxecc.cost.profiler.fit`) into the stored `Fit`."""
    widths, y, kinds = sample_arrays(prof)
    if (y <= 0).any():
        raise UserError("the meter returned a non-positive measurement: the fit needs positive values "
                        "(is the energy counter advancing? try a longer window or --meter latency)")
    result = fitting.fit_profile(info.features, widths, y, kinds, seed=int(prof.settings.get("seed", 0)), only=only)
    model = result.model
    names = [layer.name for layer in info.layers]
    iqr = np.array([s.get("iqr", 0.0) for s in prof.samples], dtype=np.float64)
    noise = {"median_rel_iqr": float(np.median(iqr / y)), "max_rel_iqr": float(np.max(iqr / y))}
    return Fit(
        variant=model.candidate.name, step=model.candidate.step, weighting=model.candidate.weighting,
        constant=model.constant,
        layers={names[i]: float(model.layers[i]) for i in range(len(names)) if info.features.active[i]},
        linear={int(v): float(c) for v, c in zip(info.features.linear_vars, model.linear) if c > 0},
        holdout=result.holdout, train=result.train,
        variants={"chosen_by": "5-fold cross-validation on the training split", "split": result.split,
                  "bilinear_holdout": result.bilinear_holdout, "noise": noise, "candidates": result.variants},
    )


def profile_cost(prof: Profile, model: onnx.ModelProto, graph, layers, variables: Variables,
                 around: float | None = None) -> BilinearCost:
    """The profile as a `BilinearCost` over `variables` (latency in seconds or energy in joules):
    constant b plus, per layer, a_l × (layer l's MACs terms) / MACs_l(full), plus linear width terms.

    Off the profile's width step (`prof.fit.step` > 1) this is the fitted model evaluated on the actual widths,
    a lower estimate between steps: compress with `--round-to step` to stay on the grid where it is exact.

    `around` (a fraction of the full model's cost, e.g. the budget) refits the same model form with samples
    weighted by closeness to that cost (log-Gaussian, σ = 0.35): more accurate near the budget where a global
    fit is not (cache-capacity regimes make small variants cheaper per MAC than large ones)."""
    if prof.fit is None:
        raise UserError(f"profile {prof.path} has no fitted model: re-run `onnxecc profile` to finish it")
    per_unit = variable_channels_per_unit(graph, variables)
    mine = [(int(g), int(len(u)), per_unit.get(v, 1)) for v, (g, u) in enumerate(zip(variables.group, variables.units))]
    theirs = [(int(v["group"]), int(v["units"]), int(v.get("channels_per_unit", 1))) for v in prof.variables]
    if mine != theirs:
        older = [x[:2] for x in mine] == [x[:2] for x in theirs]  # the same groups, head widths stepped in heads
        raise UserError(f"profile {prof.path} does not match this model's channel groups"
                        f"{' (measured before #25 stepped head counts in channels)' if older else ''}: profile this "
                        "model with `onnxecc profile`")
    costs = layer_costs(graph, layers, model, variables)
    by_name = {layer.name: k for k, layer in enumerate(layers)}
    if [v["name"] for v in prof.layers] != [layer.name for layer in layers]:
        raise UserError(f"profile {prof.path} lists other compute layers than this model: profile this model with "
                        "`onnxecc profile`")
    fit = prof.fit if around is None else local_fit(prof, _features(graph, variables, costs), layers, around)
    terms: list[Term] = []
    constant = float(fit.constant)
    for name, a in fit.layers.items():
        lc = costs[by_name[name]]
        full = lc(None)
        if a <= 0 or full <= 0:
            continue
        terms += [Term(a * t.coef / full, t.a, t.b) for t in lc.terms]
        constant += a * lc.constant / full
    for v, c in fit.linear.items():
        terms.append(Term(c / len(variables.units[v]), v))
    full_widths = {v: len(u) for v, u in enumerate(variables.units)}
    return BilinearCost(prof.metric, prof.unit, full_widths, _merge(terms), constant, channels_per_unit=per_unit)


def local_fit(prof: Profile, feats: fitting.Features, layers, around: float, sigma: float = 0.35) -> Fit:
    """The profile's model form refitted with samples weighted by how close their cost is to `around` × the
    full model's (weights exp(−½(ln(y/target)/σ)²), at least 0.05 so that every coefficient stays determined)."""
    if not 0 < around:
        raise UserError(f"around must be a positive fraction of the full cost, not {around}")
    widths, y, _ = sample_arrays(prof)
    full = next((s["value"] for s in prof.samples if s.get("kind") == "full"), float(np.max(y)))
    weights = np.maximum(0.05, np.exp(-0.5 * (np.log(y / (around * full)) / sigma) ** 2))
    cand = fitting.Candidate(prof.fit.weighting or "relative", int(prof.fit.step), "linear" in prof.fit.variant)
    model = fitting.fit_candidate(feats, widths, y, cand, sample_weights=weights)
    names = [layer.name for layer in layers]
    return Fit(variant=f"{cand.name}@{around:g}", step=cand.step, weighting=cand.weighting, constant=model.constant,
               layers={names[i]: float(model.layers[i]) for i in range(len(names)) if feats.active[i]},
               linear={int(v): float(c) for v, c in zip(feats.linear_vars, model.linear) if c > 0},
               holdout={}, train={})
