"""The closed loop of `compress`: choose, train and write back in rounds, measuring each output side by side with
the original on the target (latency; energy with the profile's meter), and re-budget until the measurement meets the
budget — over it → the internal budget is tightened; more than 10% under it → loosened (`_loosens`). `run` returns
the least over-pruned output that met the budget (never a miss when a round met it); every round is recorded.
MACs and params are counted on the file, not measured: one round.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxecc.cost.budget import Budget
from onnxecc.cost.costs import Variables
from onnxecc.cost.quantize import Int8Dropped
from onnxecc.graph import runtime
from onnxecc.graph.surgery import prune_channels
from onnxecc.methods.options import CompressOptions
from onnxecc.methods.select import projection_only, select
from onnxecc.optimize.problem import Problem
from onnxecc.train import checkpoint as checkpoints
from onnxecc.train import distributed


@dataclass
class Outcome:
    """The round whose output `compress` returns, the rounds, and what they changed: `precision` is None and
    `int8_dropped` its record when the int8 layers did not survive pruning (the problem's cost is then fp32's)."""

    keep: dict[int, np.ndarray] | None
    model: onnx.ModelProto
    estimated: float
    history: list[dict]
    rounds: list[dict]
    warnings: list[str] = field(default_factory=list)
    precision: object = None
    int8_dropped: dict | None = None


def run(model, proto: onnx.ModelProto, problem: Problem, method: str, parsed: Budget, target: float, original: float,
        data, opts: CompressOptions, emit, ck, precision, fp32_cost, profile, fmt) -> Outcome:
    """Rounds of `methods.select` (choose + train) → prune → measure, from a checkpoint's round when resumed."""
    cost, variables, graph = problem.cost, problem.variables, problem.graph
    rounds: list[dict] = []
    warnings: list[str] = []
    keep, history, estimated, int8_dropped = None, [], original, None
    internal = target
    loosen = _loosens(opts, method, data)
    max_rounds = opts.max_rounds or (6 if projection_only(method, data, opts) else 3)
    outputs: dict[int, tuple] = {}  # round -> (keep, model, estimated cost, history) of measured rounds
    first_round = 1
    if ck is not None and (saved := ck.take("compress")) is not None:  # resume: the closed-loop round
        first_round, internal, rounds[:] = saved["round"], saved["internal"], saved["rounds"]
        outputs = {int(r): _unpack_output(o) for r, o in saved["outputs"].items()}
        if precision is not None and any(r.get("next") == INT8_DROPPED for r in rounds):
            int8_dropped, precision, problem.cost, cost = saved["int8_dropped"], None, fp32_cost, fp32_cost
    since = next((i + 1 for i, r in enumerate(rounds) if r.get("next") == INT8_DROPPED), 0)  # this cost model's
    max_rounds += since > 0  # a round whose int8 did not survive is chosen again, not measured: not counted
    round_ = first_round - 1
    while round_ < max_rounds:
        round_ += 1
        round_state = lambda r=round_, b=internal, d=int8_dropped: {  # noqa: E731
            "round": r, "internal": b, "rounds": rounds, "int8_dropped": d,
            "outputs": {k: _pack_output(o) for k, o in outputs.items()}}
        trains = not projection_only(method, data, opts)
        try:
            with checkpoints.active(ck if trains else None), checkpoints.frame("compress", round_state):
                if precision is not None and trains and not (ck is not None and ck.peek("select")):
                    _plan_int8(problem, internal, precision)  # before it trains: int8 at the planned widths
                keep, trained, history = select(method, problem, internal, data, opts, emit, precision)
            emit("stage", {"name": "prune"})
            out_model = prune_channels(trained, keep, graph)
            if precision is not None:  # the closed loop measures the QDQ model that is written
                out_model = precision.apply(out_model)
        except Int8Dropped as drop:
            # the widths were bought with int8 savings that pruning took away: choose them again as width alone
            # (in one more round even after the last: resnet18 at latency 0.3 lost its int8 in the third round
            # and, kept, measured 0.42)
            rounds.append({"round": round_, "internal_budget": internal, "estimated_cost": cost(
                variables_widths(variables, drop.keep if drop.keep is not None else keep)),
                "next": INT8_DROPPED, "int8_measured": drop.when})
            int8_dropped, precision, problem.cost, cost = precision.as_dict(drop.model), None, fp32_cost, fp32_cost
            internal, since = target, len(rounds)
            max_rounds += 1
            continue
        estimated = cost(variables_widths(variables, keep))
        record = {"round": round_, "internal_budget": internal, "estimated_cost": estimated}
        rounds.append(record)
        check = distributed.on_main(  # rank 0 measures, every rank follows its verdict
            lambda m=out_model: _closed_loop_check(opts, runtime.on_disk(model, proto), m, parsed, target,
                                                   profile.meter if profile is not None else None))
        if check is None:
            break
        record.update(check)
        outputs[round_] = (keep, out_model, estimated, history)
        step = (_next_internal(rounds[since:], original, loosen) if precision is None else  # top: full int8
                _next_internal(rounds, cost(None), loosen, precision.measured.ratio))
        if step is None or round_ == max_rounds:
            break
        internal, reason = step
        if reason == "over budget" and internal < (floor := min_cost_or_zero(problem)):
            if estimated <= floor * (1 + 1e-9):  # the smallest widths measured over the budget: nothing left
                break
            internal = floor  # the smallest widths, measured once before giving up (the model was optimistic)
        record["next"] = reason
    chosen = _choose_round(rounds)
    warnings += _floor_missed(rounds, min_cost_or_zero(problem), opts, fmt)
    if chosen["round"] in outputs:  # the best measured output: never a miss when a round met the budget
        keep, out_model, estimated, history = outputs[chosen["round"]]
        if chosen["meets"] and estimated > target:
            warnings.append(f"the profile estimates the output at {fmt(estimated)}, above the budget "
                            f"{fmt(target)}, but it measured {chosen['of_budget']:.0%} of the budget on "
                            f"{opts.provider}: the measurement decides (the profile is pessimistic here)")
    return Outcome(keep, out_model, estimated, history, rounds, warnings, precision, int8_dropped)


CHECK_ROUND_S = 0.03  # closed loop: shortest wall time of one measurement round of the original
CHECK_ROUNDS = 7  # closed loop: side-by-side rounds of a first look
CONFIRM_ROUNDS = 14  # closed loop: more rounds when the first look missed or is within its noise of the budget
LOOSEN_BELOW = 0.9  # closed loop: an output measured under this share of the budget is over-pruned
AIM = 0.98  # closed loop: the share of the budget a corrected internal budget aims at (2% margin for noise)


WITHOUT_METER = "pass --no-closed-loop to keep the profile's estimate as the verdict (the output is then not measured)"


INT8_DROPPED = ("the int8 layers, timed as one set, saved no latency at the pruned widths: the widths were chosen "
                "again with the fp32 latency model (width alone)")


def _loosens(opts: CompressOptions, method: str, data) -> bool:
    """Whether the closed loop loosens an over-pruned output (`closed_loop_loosen`; None = automatic).

    Automatic: only when a round does not train (projection / uniform without data or with 0 epochs), the
    case `methods.select` handles without torch — a round is then a projection and a measurement (seconds). With
    training every round re-trains from scratch, so an output that meets the budget is kept as it is; pass
    `closed_loop_loosen=True` to trade that time for the accuracy the unused budget could buy."""
    if opts.closed_loop_loosen is not None:
        return bool(opts.closed_loop_loosen)
    return projection_only(method, data, opts)


def _next_internal(rounds: list[dict], original: float, loosen: bool, top_ratio: float | None = None,
                   ) -> tuple[float, str] | None:
    """The internal budget of the next closed-loop round and why, or None when the last round is final.

    The last round's measurement (median, side by side with the original, as `_closed_loop_check` returns it)
    is over the budget → tighten; under `LOOSEN_BELOW` of it and `loosen` → loosen. Each measured round is a
    point (estimated cost, measured share of the budget), and so is the original (its estimated cost, its
    measured latency over the budget: always a miss). Once a round met the budget, the next internal budget is
    the secant between the nearest point that met it (below) and the nearest that missed it (above — the
    original if no round missed), aiming at `AIM` of the budget (regula falsi, Illinois variant: when two
    rounds in a row land on the same side, the far end's weight is halved), so a loosening step is bracketed by the
    original, which a proportional step is not (a profile whose fixed cost is too high over-prunes, and
    scaling by measured/budget overshoots). With no round under the budget yet: proportional tightening,
    estimated × AIM / (measured / budget) — the model error observed, applied to the cost the round's widths
    were estimated at, not to its internal budget: the widths come in steps (`round_to`), so a budget 2% under
    the last one often projects the same widths, and digits_cnn spent 4 of its 6 rounds measuring one model
    again; below the last estimate, the widths that missed are out of reach. A loosened budget stays below the
    original cost.

    `top_ratio` (--knobs width,precision): `original` is then the estimated cost of the full-width int8 model and
    this its measured latency ratio to the fp32 original (`quantize.measure_precision`) — the upper end of the
    bracket instead of the fp32 original, which no pruned int8 model approaches (with the fp32 end the secant
    crept up by small steps and rounds ran out, 0.14 at budget 0.3 on resnet18). When that model meets the
    budget and no round measured it yet, the next round is full width (nothing left to prune)."""
    last = rounds[-1]
    share = last["of_budget"]
    if last["meets"] and (share >= LOOSEN_BELOW or not loosen):
        return None
    met = [(r["estimated_cost"], r["of_budget"]) for r in rounds if r["meets"]]
    if not met:
        return last["estimated_cost"] * AIM / share, "over budget"
    missed = [(r["estimated_cost"], r["of_budget"]) for r in rounds if not r["meets"]]
    top_share = last["measured_original"] / last["budget"] * (1.0 if top_ratio is None else top_ratio)
    at_top = any(r["estimated_cost"] >= original * (1 - 1e-9) for r in rounds)
    if top_share <= 1.0 and not at_top and last["meets"]:
        return original, "more than 10% under"
    if not at_top:
        missed.append((original, top_share))
    if not missed:  # full width measured and met: nothing left to loosen
        return None
    (a, sa), (b, sb) = max(met), min(missed)
    if a < b and sb > sa:
        fa, fb = sa - AIM, sb - AIM
        if len(rounds) >= 2 and rounds[-2]["meets"] == last["meets"]:  # Illinois: the far end stayed twice,
            fa, fb = (fa, fb / 2) if last["meets"] else (fa / 2, fb)  # halve its weight to stop creeping
        step = a + (b - a) * -fa / (fb - fa)
        step = min(max(step, a + 0.05 * (b - a)), b - 0.05 * (b - a))
    else:  # the measurements contradict the model's order (noise): proportional from the last round
        step = min(last["estimated_cost"] * AIM / share, original)
    if not last["meets"]:
        return step, "over budget"
    if step <= last["estimated_cost"] * (1 + 1e-9):
        return None  # no room left to loosen
    return step, "more than 10% under"


def _choose_round(rounds: list[dict]) -> dict:
    """Mark and return the round whose output `compress` returns: of the measured rounds that met the budget,
    the one with the highest measured latency (share of its budget) — the least over-pruned; else the last."""
    met = [r for r in rounds if r.get("meets")]
    chosen = max(met, key=lambda r: r["of_budget"]) if met else rounds[-1]
    chosen["selected"] = True
    return chosen


def _floor_missed(rounds: list[dict], floor: float, opts: CompressOptions, fmt) -> list[str]:
    """A warning when no round met the budget and one measured the smallest widths allowed: then the budget is
    out of this machine's reach at these settings, whatever the profile estimated (digits_resdw at latency 0.5
    on an AMD EPYC: the smallest widths estimated at 0.40 of the original, measured 0.48–0.53)."""
    if any(r.get("meets") for r in rounds):
        return []
    at_floor = [r for r in rounds if "ratio" in r and r["estimated_cost"] <= floor * (1 + 1e-9)]
    if not at_floor:
        return []
    best = min(at_floor, key=lambda r: r["measured"])
    return [f"the smallest widths allowed (every prunable group at --min-width {opts.min_width}, multiples of "
            f"--round-to {opts.round_to}) measured {fmt(best['measured'])} ({best['ratio']:.3f} of the original) "
            f"on {opts.provider}: the budget is out of reach on this machine at these settings; raise it to at "
            "least that, or allow narrower layers (--round-to, --min-width)"]


def _plan_int8(problem: Problem, internal: float, precision) -> None:
    """Before a round trains: time the full-width int8 set at the widths the projection plans for `internal`
    (the untrained model pruned; latency does not depend on the weights), raising `quantize.Int8Dropped` when
    none of it saves there. Why: an output whose int8 is dropped is an fp32 model with widths a wrong cost model
    chose (digits_resdw at latency 0.5: 9 layers int8 at full width, none at half width), and finding that out
    after the training cost mobilenet_v2 at latency 0.3 a whole re-trained round (width+precision 91.1 % vs
    width alone 95.3 %); found here, width+precision follows width alone's run from its first round."""
    keep = distributed.on_main(lambda: problem.project(internal)[0])
    precision.choose_at(prune_channels(problem.proto, keep, problem.graph),
                        "at the widths projected for the round, before it trains", keep)


def _closed_loop_check(opts: CompressOptions, original: onnx.ModelProto, compressed: onnx.ModelProto,
                       budget: Budget, target: float, meter: dict | None = None) -> dict | None:
    """Measure the output on the target provider, side by side with the original: its latency, or for an energy
    budget its energy with the profile's meter (`meter`: the profile's record of it, `profiler.meters.reopen`;
    `meter` names it in the verdict). None when the metric is not measured (MACs, params: counted on the file) or
    the closed loop is off. A fraction budget is checked on `ratio`, the median of per-round ratios (`runtime.Pair`:
    a change of the machine's speed hits both halves of a round); `measured` is then the ratio times the original's
    median, the compressed model's cost on the original's scale (`measured_median`: its own median). An absolute
    budget is checked on the compressed model's median. `of_budget` = measured / allowed.

    A miss, or a verdict within the noise of the budget, is measured again (`CONFIRM_ROUNDS` more rounds, pooled
    with the first ones; `first_look` keeps the first verdict): a miss re-trains and prunes deeper, and on a VM
    whose speed changes in spells one 5-round look timed the same mobilenet_v2 QDQ file at 0.37 and 0.62 of the
    original. Latency runs per round: at least 20, more for a fast model (one round of the original lasts at least
    `CHECK_ROUND_S`, up to 200 runs), so that a sub-millisecond model's median is not a handful of
    milliseconds of a shared machine. Energy: one window of the meter per model and round (as long as the meter
    needs for its resolution, `EnergyMeter.window_s`)."""
    if opts.metric not in ("latency", "energy") or not opts.closed_loop:
        return None
    sess_o = runtime.session(original, opts.provider, opts.threads)
    sess_c = runtime.session(compressed, opts.provider, opts.threads)
    x = runtime.example_input(sess_o, batch=1, seed=opts.seed, model=original, shapes=opts.input_shapes)
    with _pair_measurer(opts.metric, meter, sess_o, sess_c, x) as measure:
        pair = measure(CHECK_ROUNDS)
        verdict = _latency_verdict(pair, budget, target)
        if not verdict["meets"] or verdict["of_budget"] > 1 - verdict["noise_of_budget"]:
            first = {k: verdict[k] for k in ("ratio", "of_budget", "meets")} | {"rounds": CHECK_ROUNDS}
            pair = pair + measure(CONFIRM_ROUNDS)
            verdict = _latency_verdict(pair, budget, target) | {"first_look": first}
    if opts.metric == "energy":  # which meter decided, and every round's ratio (the verdict is their median)
        verdict |= {"meter": meter["spec"], "ratios": [float(r) for r in pair.ratios]}
    # where it ran: nodes per execution provider (`runtime.placement`; the provider was checked to run some)
    return verdict | {"placement": {"original": runtime.placement(sess_o), "compressed": runtime.placement(sess_c)}}


@contextmanager
def _pair_measurer(metric: str, meter: dict | None, sess_o, sess_c, x: np.ndarray):
    """`measure(rounds)` → a `runtime.Pair` of the original (a) and the compressed model (b) measured in that many
    alternating rounds: latency with `runtime.measure_pair`, energy with the profile's meter
    (`profiler.measure_pair`; the meter is opened once here and closed on exit)."""
    if metric == "latency":
        probe = runtime.measure_latency(sess_o, x, warmup=2, repeats=3).median_s
        repeats = int(np.clip(CHECK_ROUND_S / max(probe, 1e-9), 20, 200))
        yield lambda rounds: runtime.measure_pair(sess_o, sess_c, x, rounds=rounds, repeats=repeats)
        return
    if not meter:
        raise ValueError("an energy budget is measured with the meter of its profile: pass the profile's `meter`")
    from onnxecc.cost.profiler import measure_pair, recorded_meter

    feed_o, feed_c = runtime.feed(sess_o, x), runtime.feed(sess_c, x)
    run_o, run_c = (lambda: sess_o.run(None, feed_o)), (lambda: sess_c.run(None, feed_c))
    with recorded_meter(meter, WITHOUT_METER) as m:
        yield lambda rounds: measure_pair(m, run_o, run_c, rounds, repeats=1, warmup=10)


def _latency_verdict(pair: runtime.Pair, budget: Budget, target: float) -> dict:
    """`_closed_loop_check`'s record of one side-by-side measurement (original a, compressed b): latency in
    seconds, or energy in joules (the `Timing` fields then hold joules)."""
    t_o, t_c, ratio = pair.a, pair.b, pair.ratio
    if budget.fraction is not None:
        allowed, measured = budget.fraction * t_o.median_s, ratio * t_o.median_s
        noise = pair.ratio_iqr / budget.fraction
    else:
        allowed, measured, noise = target, t_c.median_s, t_c.iqr_s / target
    return {"measured": measured, "measured_original": t_o.median_s, "measured_median": t_c.median_s,
            "budget": allowed, "iqr": t_c.iqr_s, "ratio_iqr": pair.ratio_iqr, "meets": measured <= allowed,
            "ratio": ratio, "of_budget": measured / allowed, "noise_of_budget": noise, "timed_rounds": len(pair.ratios)}


def _pack_output(output: tuple) -> dict:
    """A measured closed-loop round's output as checkpoint data (see `onnxecc.train.checkpoint.plain`)."""
    keep, model, estimated, history = output
    return {"keep": checkpoints.keep_to_plain(keep), "model": model.SerializeToString(), "estimated": estimated,
            "history": history}


def _unpack_output(saved: dict) -> tuple:
    model = onnx.ModelProto()
    model.ParseFromString(saved["model"])
    return checkpoints.keep_from_plain(saved["keep"]), model, saved["estimated"], saved["history"]


def variables_widths(variables: Variables, keep: dict[int, np.ndarray]) -> dict[int, int]:
    """Kept units per variable, from kept units per group."""
    out = {}
    for v, (g, units) in enumerate(zip(variables.group, variables.units)):
        if g in keep:
            out[v] = int(np.isin(units, keep[g]).sum())
    return out


def min_cost_or_zero(problem: Problem) -> float:
    from onnxecc.optimize.projection import min_cost

    return min_cost(problem.cost, problem.prunable, problem.min_width, problem.round_to)
