"""ECC offline phase: meters against fixture counters, the NNLS fit on known models, the profile JSON (round trip,
resume, validation), the torch-free import, and profile → compress end to end on the demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_MODELS, REPO

from onnxecc.core.errors import UserError
from onnxecc.cost.profiler import ModelInfo, load_profile, profile, profile_cost, sampling, store
from onnxecc.cost.profiler import fit as fitting
from onnxecc.cost.profiler.meters import (
    CmdMeter,
    CpuTimeMeter,
    JetsonMeter,
    LatencyMeter,
    Meter,
    RaplMeter,
    find_rails,
    integrate,
    make_meter,
    summarize,
)
from onnxecc.graph import runtime

CNN = DEMO_MODELS[0]
RESDW = DEMO_MODELS[1]
SHIPPED = REPO / "profiles" / "digits_cnn.cpu.json"
FAST = {"warmup": 1, "repeats": 3}


# ---- the profiler runs where only onnxruntime + numpy are installed ------------------------------------------------
def test_profiler_imports_and_runs_without_torch(tmp_path):
    code = f"""
import sys
for name in ("torch", "torchvision", "onnx2torch", "cvxpy", "scipy", "sklearn"):
    sys.modules[name] = None  # any import of these raises ImportError
import onnxecc.cost.profiler, onnxecc.cost.profiler.meters, onnxecc.cost.profiler.fit, onnxecc.cost.profiler.store
import onnxecc.cost.profiler.sampling, onnxecc.cost.profiler.bench
from onnxecc.cli import main
sys.argv = ["onnxecc", "profile", {str(CNN)!r}, "-o", {str(tmp_path / "p.json")!r}, "--samples", "6",
            "--warmup", "1", "--repeats", "3", "--knobs", "width,precision"]
main()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    assert len(data["samples"]) == 6 and data["fit"] is not None
    assert data["precision"]["layers"]  # the int8 measurement runs without torch too (onnxruntime.quantization)


# ---- meters ----------------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_latency_meter_median_and_iqr():
    clock = FakeClock()
    durations = iter([1, 1, 1, 1, 1, 3, 5, 4, 2, 100])  # 1 warm-up run, then 9 timed (one outlier)

    def run():
        clock.t += next(durations)

    m = LatencyMeter(clock=clock).measure(run, warmup=1, repeats=9)
    assert m.value == 2.0 and m.repeats == 9
    assert m.iqr == pytest.approx(np.subtract(*np.percentile([1, 1, 1, 1, 3, 5, 4, 2, 100], [75, 25])))


def _spin(cpu_s: float) -> None:
    """Burn at least `cpu_s` CPU seconds of the calling thread, read with `time.thread_time` itself."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def test_cputime_meter_counts_this_thread():
    """CPU seconds of the calling thread only: a run that spins 10 ms of its CPU reads at least that, a run that
    sleeps 20 ms (wall time, no CPU) or waits for another thread's 10 ms of CPU reads almost nothing."""
    meter = CpuTimeMeter(min_time_s=0)  # exactly `repeats` runs: a sleeping run never adds up to min_time_s
    assert meter.measure(lambda: _spin(0.01), warmup=1, repeats=3).value >= 0.01
    assert meter.measure(lambda: time.sleep(0.02), warmup=1, repeats=3).value < 0.003

    def elsewhere():
        worker = threading.Thread(target=_spin, args=(0.01,))
        worker.start()
        worker.join()

    assert meter.measure(elsewhere, warmup=1, repeats=3).value < 0.003
    assert make_meter("cputime").name == "cputime"


def _rapl_zone(root: Path, name: str, energy: int, max_range: int, label: str) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    (zone / "name").write_text(label + "\n")
    return zone


def test_rapl_meter_fixture_with_wraparound(tmp_path):
    top = 1_000_000
    pkg0 = _rapl_zone(tmp_path, "intel-rapl:0", top - 700, top, "package-0")
    _rapl_zone(tmp_path, "intel-rapl:0:0", 5, top, "core")  # a sub-zone: part of package-0, not added again
    pkg1 = _rapl_zone(tmp_path, "intel-rapl:1", 10, top, "package-1")
    meter = RaplMeter(root=str(tmp_path), window_s=0.0)
    assert [d.name for d in meter.domains] == ["intel-rapl:0", "intel-rapl:1"]

    def run():  # each inference: 300 µJ on package 0 (wrapping at max_energy_range_uj), 50 µJ on package 1
        for zone, add in ((pkg0, 300), (pkg1, 50)):
            value = (int((zone / "energy_uj").read_text()) + add) % top
            (zone / "energy_uj").write_text(f"{value}\n")

    state = meter.begin()
    for _ in range(4):  # crosses the wrap: 999300 → 200
        run()
    assert meter.end(state) == pytest.approx(4 * 350e-6)
    m = meter.measure(run, warmup=2, repeats=7)
    assert m.value == pytest.approx(350e-6) and m.iqr == pytest.approx(0.0, abs=1e-12)
    explicit = make_meter(f"rapl:{pkg1}")
    assert explicit.metric == "energy" and explicit.names == ["package-1"]


def test_rapl_meter_errors(tmp_path):
    with pytest.raises(UserError, match="no RAPL"):
        RaplMeter(root=str(tmp_path))
    with pytest.raises(UserError, match="no energy_uj"):
        make_meter(f"rapl:{tmp_path}")
    zone = _rapl_zone(tmp_path, "intel-rapl:0", 1, 10, "package-0")
    (zone / "energy_uj").write_text("garbage\n")
    with pytest.raises(UserError, match="cannot read a number"):
        RaplMeter(root=str(tmp_path))


def _jetson_fixture(root: Path) -> dict[str, Path]:
    iio = root / "ina3221x" / "1-0040" / "iio:device0"
    iio.mkdir(parents=True)
    for k, (label, mw) in enumerate([("VDD_IN", 2500), ("VDD_CPU_GPU_CV", 1500), ("VDD_SOC", 700)]):
        (iio / f"in_power{k}_input").write_text(f"{mw}\n")
        (iio / f"rail_name_{k}").write_text(label + "\n")
    hw = root / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    hw.mkdir(parents=True)
    (hw / "in1_input").write_text("5000\n")  # mV
    (hw / "curr1_input").write_text("600\n")  # mA → 3000 mW
    (hw / "in1_label").write_text("VDD_IN\n")
    return {"iio": iio, "hwmon": hw}


def test_jetson_rails_and_integration(tmp_path):
    fx = _jetson_fixture(tmp_path)
    patterns = (str(tmp_path / "ina3221x/*/iio:device*/in_power*_input"),)
    rails = find_rails(patterns=patterns)
    assert [r.label for r in rails] == ["VDD_IN"]  # the board input only: the other rails are parts of it
    hw = find_rails([str(fx["hwmon"] / "in1_input")])
    assert hw[0].milliwatts() == pytest.approx(3000.0)
    with pytest.raises(UserError, match="neither a power file"):
        find_rails([str(fx["hwmon"] / "curr1_input")])
    assert integrate([(0.0, 1.0), (1.0, 3.0), (3.0, 3.0)]) == pytest.approx(2.0 + 6.0)

    clock = FakeClock()
    meter = JetsonMeter(paths=[str(fx["iio"] / "in_power1_input"), str(fx["iio"] / "in_power2_input")],
                        interval_s=0.001, clock=clock, window_s=0.0)

    def run():  # one inference takes 1 ms of (fake) time at a constant 2.2 W
        clock.t += 1e-3

    m = meter.measure(run, warmup=1, repeats=5)
    assert m.value == pytest.approx(2.2 * 1e-3)


def test_cmd_meter(tmp_path):
    assert CmdMeter("cmd", f'{sys.executable} -c "print(1.5)"').read() == 1.5
    meter = make_meter(f'cmd:{sys.executable} -c "print(1.5)"')
    assert meter.read() == 1.5 and meter.measure(lambda: None, 0, 3).value == 0.0
    assert make_meter('cmd:"echo 2.5"').read() == 2.5  # quotes around the whole command are dropped
    counter = tmp_path / "counter.py"  # an external meter: cumulative joules, 1.5 J more at every reading
    counter.write_text("import pathlib\np = pathlib.Path(__file__).with_suffix('.txt')\n"
                       "v = float(p.read_text()) if p.exists() else 0.0\nv += 1.5\np.write_text(str(v))\n"
                       "print(f'energy: {v} J')\n")
    meter = CmdMeter("cmd", f"{sys.executable} {counter}", window_s=0.0)
    assert meter.measure(lambda: None, 0, 4).value == pytest.approx(1.5)
    with pytest.raises(UserError, match="printed no number"):
        CmdMeter("cmd", f'{sys.executable} -c "print(\'no\')"')
    with pytest.raises(UserError, match="exited with 3"):
        CmdMeter("cmd", f'{sys.executable} -c "raise SystemExit(3)"')


def test_nvml_meter_errors_and_fake_counter(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(UserError, match="nvidia-ml-py"):
        make_meter("nvml")

    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(energy=1000)

    def init():
        if fake.fail:
            raise NVMLError("Driver Not Loaded")

    def energy(handle):
        fake.energy += 40  # mJ per reading
        return fake.energy

    fake.fail = True
    fake.nvmlInit, fake.nvmlShutdown = init, lambda: None
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda i: "gpu0"
    fake.nvmlDeviceGetName = lambda h: b"Fake GPU"
    fake.nvmlDeviceGetTotalEnergyConsumption = energy
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(UserError, match="no NVIDIA GPU"):
        make_meter("nvml")
    fake.fail = False
    with pytest.raises(UserError, match="1 GPU"):
        make_meter("nvml:3")
    meter = make_meter("nvml:0")
    meter.window_s = 0.0
    assert meter.describe()["gpu"] == "Fake GPU"
    assert meter.measure(lambda: None, 0, 3).value == pytest.approx(0.040)


def test_make_meter_rejects_unknown():
    with pytest.raises(UserError, match="unknown --meter"):
        make_meter("joulescope")
    with pytest.raises(UserError, match="integer"):
        make_meter("nvml:x")


@pytest.mark.skipif(os.environ.get("ONNXECC_TEST_NVML") != "1", reason="needs an NVIDIA GPU (ONNXECC_TEST_NVML=1)")
def test_nvml_meter_on_a_real_gpu():
    meter = make_meter("nvml")
    assert meter.read() > 0
    meter.close()


# ---- the fit -------------------------------------------------------------------------------------------------
def test_nnls_matches_a_reference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 12))
    b = rng.standard_normal(40)
    x = fitting.nnls(a, b)
    assert (x >= 0).all()
    # KKT: the gradient is zero on the positive coefficients and non-negative on the zero ones
    grad = a.T @ (a @ x - b)
    assert np.allclose(grad[x > 0], 0, atol=1e-9) and (grad[x == 0] >= -1e-9).all()
    scipy_opt = pytest.importorskip("scipy.optimize")
    assert np.allclose(x, scipy_opt.nnls(a, b)[0], atol=1e-8)


@pytest.fixture(scope="module")
def resdw_info():
    return ModelInfo.of(RESDW)


def _synthetic(info, n, rng, noise=0.0, step=1):
    samples = [sampling.sample(info.graph, i, seed=3, step=1) for i in range(n)]
    widths = np.array([sampling.variable_widths(info.variables, s.keep) for s in samples], dtype=np.float64)
    kinds = [s.kind for s in samples]
    coef = np.zeros(len(info.layers))
    coef[info.features.active] = rng.uniform(1e-6, 5e-6, int(info.features.active.sum()))
    coef[np.where(info.features.active)[0][::3]] = 0.0  # some layers cost nothing
    b = 7e-6
    y = b + info.features.layers(widths, step) @ coef
    y = y * (1 + noise * rng.standard_normal(n))
    return widths, y, kinds, coef, b


def test_fit_recovers_a_known_bilinear_model(resdw_info):
    info = resdw_info
    widths, y, kinds, coef, b = _synthetic(info, 120, np.random.default_rng(1))
    res = fitting.fit_profile(info.features, widths, y, kinds, only=fitting.Candidate("relative", 1, False))
    assert res.model.constant == pytest.approx(b, rel=1e-6)
    # layers whose features coincide on every width vector (same groups, same form) share one coefficient sum
    feats = info.features.layers(widths)
    classes: dict[bytes, list[int]] = {}
    for k in np.where(info.features.active)[0]:
        classes.setdefault(np.round(feats[:, k], 12).tobytes(), []).append(k)
    assert any(len(c) > 1 for c in classes.values())
    for members in classes.values():
        assert res.model.layers[members].sum() == pytest.approx(coef[members].sum(), rel=1e-6, abs=1e-15)
    assert res.holdout["max_rel_error"] < 1e-8


def test_fit_with_noise_and_step_selection(resdw_info):
    info = resdw_info
    widths, y, kinds, coef, b = _synthetic(info, 150, np.random.default_rng(2), noise=0.01)
    res = fitting.fit_profile(info.features, widths, y, kinds, only=fitting.Candidate("relative", 1, False))
    assert res.holdout["mean_rel_error"] < 0.02
    full = res.model.predict(info.features, info.features.full[None, :])[0]
    assert full == pytest.approx(b + coef.sum(), rel=0.02)
    # measurements with a kernel block of 16 (widths padded up): cross-validation finds the step
    widths, y, kinds, coef, b = _synthetic(info, 150, np.random.default_rng(3), noise=0.005, step=16)
    res = fitting.fit_profile(info.features, widths, y, kinds, steps=(1, 8, 16))
    assert res.model.candidate.step == 16 and res.holdout["mean_rel_error"] < 0.02
    assert res.variants["plain"]["holdout"]["mean_rel_error"] > res.holdout["mean_rel_error"]


def test_sampling_is_reproducible_and_on_the_grid(resdw_info):
    g = resdw_info.graph
    a = sampling.plan(g, 8, seed=5, step=16)
    b = [sampling.sample(g, i, seed=5, step=16) for i in range(8)]
    assert [s.widths for s in a] == [s.widths for s in b]
    assert a[0].kind == "full" and not a[0].keep and a[1].kind == "uniform0.25"
    for s in a:
        for gid, w in s.widths.items():
            assert w % 16 == 0 or w == g.groups[gid].size
    assert sampling.allowed(40, 1, 16).tolist() == [16, 32, 40]
    assert sampling.allowed(10, 1, 16).tolist() == [10]
    assert sampling.auto_step("CUDAExecutionProvider") == 8


# ---- profiles: end to end, JSON, resume, validation ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "cnn.json"
    prof = profile(CNN, path, samples=12, meter="cputime", **FAST)
    return path, prof


def test_profile_end_to_end_full_width_estimate(cnn_profile):
    path, prof = cnn_profile
    assert prof.fit is not None and len(prof.samples) == 12
    info = ModelInfo.of(CNN)
    cost = profile_cost(load_profile(path, CNN), info.model, info.graph, info.layers, info.variables)
    assert cost.metric == "latency" and cost.unit == "s"
    assert all(t.coef >= 0 for t in cost.terms) and cost.constant >= 0
    sess = runtime.session(CNN)
    x = runtime.example_input(sess)
    # measured again now: the least disturbed of three medians. Only within 2×: this shared VM runs at 1× and
    # 1.7× speed in spells of seconds, and the profile's level is that of the spells it was measured in (an
    # estimate of 65.6 µs against 43.1 measured, and 122 against 80.5 after pairing, failed a 30% check)
    measured = min(CpuTimeMeter().measure(lambda: sess.run(None, {"input": x}), 10, 50).value for _ in range(3))
    assert measured / 2 < cost(None) < measured * 2
    # the fit's shape, which spells do not move: the uniform 50% variant over the full model, as estimated and as
    # timed side by side now (the median of per-round ratios)
    half = next(s for s in prof.samples if s["kind"] == "uniform0.5")
    variant = runtime.session(sampling.build(info.model, info.graph, sampling.sample(
        info.graph, half["index"], 0, 1, int(prof.settings["step"]))))
    timed = runtime.measure_pair(sess, variant, x, rounds=9, repeats=50).ratio
    assert cost(dict(enumerate(half["widths"]))) / cost(None) == pytest.approx(timed, rel=0.3)
    # the full model's own sample: within 0.15 on an AMD EPYC; an Intel Xeon's 12-sample fits land 0.30-0.33
    # under it
    assert cost(None) == pytest.approx(prof.samples[0]["value"], rel=0.4)
    # the cost at a sample's widths is the fitted model's prediction there
    s = prof.samples[5]
    widths = dict(enumerate(s["widths"]))
    feats = info.features
    expected = prof.fit.constant + sum(
        prof.fit.layers.get(layer.name, 0.0) * f
        for layer, f in zip(info.layers, feats.layers(np.array([s["widths"]], float), 1)[0]))
    expected += sum(c * s["widths"][v] / feats.full[v] for v, c in prof.fit.linear.items())
    assert cost(widths) == pytest.approx(expected, rel=1e-9)
    # a refit around a budget: on measurements the model reproduces exactly, it finds the same model. A fit of
    # step k sees each width snapped up to a multiple of k (`Features.snap`), where it is the bilinear cost: the
    # exact measurements are the cost there (a step-32 fit won on an Intel Xeon's samples)
    def snapped(w):
        return dict(enumerate(int(v) for v in feats.snap(np.array([w], float), prof.fit.step)[0]))

    exact = load_profile(path, CNN)
    for sample in exact.samples:
        sample["value"] = cost(snapped(sample["widths"]))
    local = profile_cost(exact, info.model, info.graph, info.layers, info.variables, around=0.5)
    assert all(t.coef >= 0 for t in local.terms)
    for sample in exact.samples:
        assert local(snapped(sample["widths"])) == pytest.approx(sample["value"], rel=1e-6)


def test_profile_json_round_trip(cnn_profile, tmp_path):
    path, prof = cnn_profile
    again = store.read(path)
    assert again.as_dict() == json.loads(json.dumps(prof.as_dict()))
    copy = tmp_path / "copy.json"
    again.save(copy)
    assert json.loads(copy.read_text()) == json.loads(path.read_text())
    data = json.loads(path.read_text())
    assert data["model"]["fingerprint"] == store.fingerprint(onnx.load(CNN))
    for key in ("provider", "provider_options", "meter", "machine", "samples", "fit", "tool", "settings"):
        assert key in data
    assert data["fit"]["holdout"]["n"] >= 1


def test_fingerprint_ignores_weight_values_not_structure():
    model = onnx.load(CNN)
    fp = store.fingerprint(model)
    tuned = onnx.load(CNN)
    w = tuned.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(w) * 1.01
    w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), w.name))
    assert store.fingerprint(tuned) == fp
    assert store.fingerprint(onnx.load(RESDW)) != fp


def test_resume_measures_only_missing_samples(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    seen = []

    def stop_after_three(done, total, sample):
        if sample:
            seen.append(sample["index"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile(RESDW, path, samples=7, meter="cputime", on_progress=stop_after_three, **FAST)
    partial = json.loads(path.read_text())
    assert [s["index"] for s in partial["samples"]] == [0, 1, 2] and partial["fit"] is None
    with pytest.raises(UserError, match="no fitted model"):
        load_profile(path, RESDW)
    seen.clear()
    prof = profile(RESDW, path, samples=7, meter="cputime", on_progress=lambda d, t, s: s and seen.append(s["index"]),
                   **FAST)
    assert seen == [3, 4, 5, 6]
    # the three measurements are kept (paired: their values are put on the whole profile's reference again)
    measured = ("index", "widths", "ratio", "ratio_iqr", "reference", "unpaired_value", "seconds")
    assert [{k: s[k] for k in measured} for s in prof.samples[:3]] == [{k: s[k] for k in measured}
                                                                        for s in partial["samples"]]
    level = float(np.median([s["reference"] for s in prof.samples]))
    assert all(s["value"] == pytest.approx(s["ratio"] * level) for s in prof.samples)
    with pytest.raises(UserError, match="other settings"):
        profile(RESDW, path, samples=7, meter="cputime", warmup=2, repeats=3)
    with pytest.raises(UserError, match="different model"):
        profile(CNN, path, samples=7, meter="cputime", **FAST)


def test_bad_profiles_are_user_errors(cnn_profile, tmp_path):
    path, _ = cnn_profile
    with pytest.raises(UserError, match="different model structure"):
        load_profile(path, RESDW)
    cases = {
        "notjson.json": "this is not json {",
        "list.json": "[1, 2]",
        "format.json": json.dumps({"format": "other"}),
    }
    data = json.loads(path.read_text())
    del data["fit"]["layers"]
    cases["nolayers.json"] = json.dumps(data)
    data = json.loads(path.read_text())
    data["samples"][0]["widths"] = [1]
    cases["widths.json"] = json.dumps(data)
    data = json.loads(path.read_text())
    data["fit"]["layers"][next(iter(data["fit"]["layers"]))] = -1.0
    cases["negative.json"] = json.dumps(data)
    for name, text in cases.items():
        bad = tmp_path / name
        bad.write_text(text)
        with pytest.raises(UserError) as exc:
            load_profile(bad, CNN)
        assert "\n" not in str(exc.value), name
    (tmp_path / "binary.json").write_bytes(b"\x80\x81\xfe")
    with pytest.raises(UserError, match="not JSON"):
        load_profile(tmp_path / "binary.json")
    with pytest.raises(UserError, match="not found"):
        load_profile(tmp_path / "missing.json")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_bad_profile_exits_2_with_one_line(cnn_profile, tmp_path):
    path, _ = cnn_profile
    (tmp_path / "bad.json").write_text("{not json")
    data = json.loads(path.read_text())
    del data["metric"]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    for profile_path, model in ((path, RESDW), (tmp_path / "bad.json", CNN), (tmp_path / "missing.json", CNN)):
        proc = _cli("compress", str(model), "--metric", "latency", "--profile", str(profile_path), "--budget", "0.5",
                    "--epochs", "0", "-o", str(tmp_path / "out.onnx"))
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    proc = _cli("compress", str(CNN), "--metric", "energy", "--profile", str(path), "--budget", "0.5", "--epochs", "0",
                "-o", str(tmp_path / "out.onnx"))
    assert proc.returncode == 2 and "measures latency" in proc.stderr
    proc = _cli("profile", str(CNN), "-o", str(tmp_path / "p.json"), "--meter", "rapl:/nonexistent")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_shipped_profile_drives_compress(tmp_path):
    from onnxecc.compress import CompressOptions, compress

    prof = load_profile(SHIPPED, CNN)
    assert prof.metric == "latency" and prof.fit.holdout["n"] > 0
    out = tmp_path / "small.onnx"
    # closed_loop=False: the estimate is what this test checks. With the closed loop on, a round measured far
    # under the budget is loosened, and the estimate of the returned output may then exceed the budget while
    # its measurement meets it (noise-dependent: CI once saw 0.504 estimated vs 0.481 measured).
    result = compress(CNN, "0.5", out, CompressOptions(metric="latency", profile=str(SHIPPED), epochs=0,
                                                       measure_latency=False, closed_loop=False))
    assert result.pruned and out.exists()
    assert result.estimated_cost <= 0.5 * result.original_cost * (1 + 1e-9)
    info = ModelInfo.of(CNN)
    cost = profile_cost(prof, info.model, info.graph, info.layers, info.variables)
    assert result.original_cost == pytest.approx(cost(None))


def test_compress_warns_when_the_profile_was_measured_on_another_cpu(tmp_path):
    """A profile carries the CPU it was measured on: compress says so when this machine's differs, and is
    silent when they are the same."""
    from onnxecc.compress import CompressOptions, compress
    from onnxecc.cost.profiler.store import cpu_name

    data = json.loads(SHIPPED.read_text())
    warned = {}
    for cpu in (cpu_name(), "Another CPU 9000"):
        data["machine"]["cpu"] = cpu
        prof = tmp_path / "p.json"
        prof.write_text(json.dumps(data))
        result = compress(CNN, "0.5", None, CompressOptions(metric="latency", profile=str(prof), epochs=0,
                                                            measure_latency=False, closed_loop=False))
        warned[cpu] = [w for w in result.warnings if "the profile was measured on" in w]
    assert warned[cpu_name()] == []
    assert len(warned["Another CPU 9000"]) == 1 and "onnxecc profile" in warned["Another CPU 9000"][0]


# ---- --knobs width,precision: the int8 measurement stored in the profile (issue #11) ----------------------------
def test_profile_with_precision_round_trips_and_resumes(tmp_path):
    """`profile(..., knobs="width,precision")`: the precision section (per-layer int8 savings, the choice,
    int8 timed at the width anchors) is plain JSON tied to the model, provider and threads, read back equal, and
    a resumed profile keeps it (not measured again)."""
    from onnxecc.cost.quantize import PrecisionProfile, candidates

    out = tmp_path / "p.json"
    prof = profile(CNN, out, samples=6, knobs="width,precision", **FAST)
    sec = prof.precision
    assert sec["fingerprint"] == prof.fingerprint and sec["provider"] == prof.provider and sec["threads"] == 1
    assert set(sec["layers"]) == set(candidates(onnx.load(CNN))) and sec["machine"]["cpu"] == prof.machine["cpu"]
    assert "random" in sec["calibration"]
    measured = PrecisionProfile.from_dict(sec)
    assert measured.chosen == sec["int8_layers"]
    if measured.chosen:  # int8 timed at the 25/50/75 % anchors
        assert [s["kind"] for s in sec["samples"]] == ["uniform0.25", "uniform0.5", "uniform0.75"]
        assert all(len(s["widths"]) == len(prof.variables) and s["int8_ms"] > 0 for s in sec["samples"])
    back = load_profile(out, CNN)
    assert back.precision == json.loads(out.read_text())["precision"] == json.loads(json.dumps(sec))
    again = profile(CNN, out, samples=6, knobs="width,precision", **FAST)  # resume: nothing left to measure
    assert again.precision["fp32_ms"] == sec["fp32_ms"]
    width_only = profile(CNN, tmp_path / "w.json", samples=6, **FAST)
    assert width_only.precision is None and "precision" not in json.loads((tmp_path / "w.json").read_text())
    with pytest.raises(UserError, match="--meter latency"):
        profile(CNN, tmp_path / "c.json", samples=6, knobs="width,precision", meter="cputime", **FAST)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(provider="CUDAExecutionProvider"), "precision.provider"),
    (lambda s: s.update(threads=4), "precision.threads"),
    (lambda s: s.update(fingerprint="0" * 64), "another model"),
    (lambda s: s.update(fp32_ms=-1.0), "precision.fp32_ms"),
    (lambda s: s["layers"].update({"/no/such/Conv": next(iter(s["layers"].values()))}), "not a compute layer"),
    (lambda s: next(iter(s["layers"].values())).pop("int8"), "int8"),
])
def test_a_hand_edited_precision_section_is_a_one_line_user_error(tmp_path, edit, match):
    prof = load_profile(SHIPPED, CNN)
    data = prof.as_dict()
    names = [v["name"] for v in data["layers"]]
    data["precision"] = {"fingerprint": prof.fingerprint, "provider": prof.provider, "threads": 1, "fp32_ms": 0.05,
                         "int8_all_ms": 0.03, "chosen_ms": 0.03, "samples": [],
                         "layers": {n: {"int8": True, "saving_ms": 0.01, "noise_ms": 0.0, "reason": ""}
                                    for n in names[1:3]}}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(data))
    assert load_profile(good, CNN).precision["layers"]
    edit(data["precision"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match=match) as err:
        load_profile(bad, CNN)
    assert "\n" not in str(err.value)


# ---- paired profiling: a machine whose speed changes in spells ----------------------------------------------------
class _SpellMeter(Meter):
    """A machine (not onnxruntime: `run` returns the model's true cost) that runs at 1× and 1.7× speed in spells
    of `spell` measurements — what the shared AMD EPYC VM here did to the same mobilenet_v2 (0.42 vs 0.72 ms)."""

    def __init__(self, spell: int):
        super().__init__("spell")
        self.calls, self.spell = 0, spell

    def measure(self, run, warmup, repeats):
        slow = (self.calls // self.spell) % 2 == 1
        self.calls += 1
        return summarize([run() * (1.7 if slow else 1.0)] * repeats)


def test_paired_measurement_cancels_spells_that_an_unpaired_one_carries():
    from onnxecc.cost.profiler import _measure, _measure_paired

    full, variant = (lambda: 2.0), (lambda: 0.5)  # true ratio 0.25
    rec, tries = _measure_paired(_SpellMeter(spell=2), full, variant, warmup=0, repeats=10)
    assert rec["ratio"] == pytest.approx(0.25) and rec["ratio_iqr"] == pytest.approx(0.0) and tries == 1
    # each round's reference and variant fall in the same spell; alone, the variant's level is the spell's
    alone = [_measure(_SpellMeter(spell=1), variant, 0, 10)[0].value for _ in range(2)]
    meter = _SpellMeter(spell=1)
    meter.measure(variant, 0, 1)  # the next measurement falls in a slow spell
    alone.append(_measure(meter, variant, 0, 10)[0].value)
    assert sorted(alone) == pytest.approx([0.5, 0.5, 0.85])


def test_paired_profile_values_are_ratios_on_one_reference(tmp_path):
    """Real onnxruntime: every sample's value is its measured ratio to the full model times the median of all
    samples' reference timings (recomputed here), the full model's own sample is ≈1× it, and the fit runs."""
    prof = profile(CNN, tmp_path / "p.json", samples=6, meter="cputime", warmup=1, repeats=5)
    assert prof.settings["paired"] is True
    level = float(np.median([s["reference"] for s in prof.samples]))
    for s in prof.samples:
        assert s["value"] == pytest.approx(s["ratio"] * level) and s["rounds"] == 5
    full = next(s for s in prof.samples if s["kind"] == "full")
    assert 0.8 < full["ratio"] < 1.25
    assert load_profile(tmp_path / "p.json", CNN).samples == prof.samples and prof.fit is not None
    unpaired = profile(CNN, tmp_path / "u.json", samples=3, meter="cputime", paired=False, warmup=1, repeats=5)
    assert "paired" not in unpaired.settings and all("ratio" not in s for s in unpaired.samples)
