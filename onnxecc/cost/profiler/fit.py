"""Fitting the bilinear cost model to measurements (numpy only).

Features. For compute layer l, f_l(w) = MACs_l(w) / MACs_l(full): exactly (s_in/S_in)·(s_out/S_out) for a
plain conv or Gemm, s/S for a depthwise conv, the right mix for Concat inputs and Flatten→Gemm blocks — the
per-layer terms of `costs.macs_cost`. The model is

    E(w) = b + Σ_l a_l · f_l(snap(w)) [+ Σ_v c_v · snap(w)_v / S_v],     a, b, c ≥ 0,

where snap rounds each width up to a multiple of `step` channels (capped at the full width; step 1 = no
snapping): CPU kernels work on blocks of channels, so a layer with 17 output channels costs about what one with
32 costs when the block is 16. A width counts units, so a variable whose unit is a head of p channels snaps in
steps of step / gcd(step, p) heads (a head of 64 channels: any head count). Every candidate is a non-negative
combination of bilinear terms, so it is a `BilinearCost` in the (snapped) widths, and on widths that are
multiples of `step` channels it *is* the bilinear cost that the projection uses (compress with
`--round-to step`, which counts channels too).

Fitting: non-negative least squares (Lawson–Hanson active set, implemented here), either plain or weighted
by 1/measurement so that it minimises *relative* error. Candidates (weighting × step × linear terms) are
compared by cross-validation on the training samples only; the held-out 20% is touched once, to report
the chosen model's error (and, for comparison, every candidate's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STEPS = (1, 2, 4, 8, 16, 32)


# ---- NNLS ----------------------------------------------------------------------------------------------------
def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin ‖a·x − b‖₂ subject to x ≥ 0 (Lawson & Hanson 1974, active-set method)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).ravel()
    m, n = a.shape
    if n == 0:
        return np.zeros(0)
    # Scale columns to unit norm: the active-set tests then use one tolerance for every column.
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    a_s = a / norms
    max_iter = max_iter if max_iter is not None else 3 * n + 30
    tol = 10 * np.finfo(np.float64).eps * max(m, n) * max(1.0, np.abs(a_s).sum(axis=0).max()) \
        * max(1.0, np.linalg.norm(b))
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a_s.T @ (b - a_s @ x)
    for _ in range(max_iter):
        candidates = np.where(~passive & (w > tol))[0]
        if candidates.size == 0:
            break
        passive[candidates[np.argmax(w[candidates])]] = True
        while True:
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(a_s[:, passive], b, rcond=None)[0]
            if np.all(s[passive] > 0):
                break
            bad = passive & (s <= 0)
            alpha = np.min(x[bad] / np.maximum(x[bad] - s[bad], np.finfo(np.float64).tiny))
            x = x + alpha * (s - x)
            passive &= x > tol
            if not passive.any():
                s = np.zeros(n)
                break
        x = s
        w = a_s.T @ (b - a_s @ x)
    return np.maximum(x, 0.0) / norms


# ---- features ------------------------------------------------------------------------------------------------
class Features:
    """Per-layer MACs fractions and per-variable width fractions of width vectors (one row per sample).

    `layer_costs[l]` is layer l's MACs as a `BilinearCost` over the width variables; `full[v]` the full width
    of variable v; `prunable[v]` whether it varies (frozen variables stay at full width); `per_unit[v]` the
    channels one unit of v stands for (a head's width; 1 by default), which the snap to a channel step needs."""

    def __init__(self, layer_costs, full: np.ndarray, prunable: np.ndarray, per_unit: np.ndarray | None = None):
        self.full = np.asarray(full, dtype=np.float64)
        self.prunable = np.asarray(prunable, dtype=bool)
        self.per_unit = np.ones(self.full.size, dtype=np.int64) if per_unit is None \
            else np.asarray(per_unit, dtype=np.int64)
        nv = self.full.size
        self.terms = []
        self.full_value = np.zeros(len(layer_costs))
        self.active = np.zeros(len(layer_costs), dtype=bool)
        for k, cost in enumerate(layer_costs):
            coef, a, b = cost.vectorized()
            a = np.where(a < 0, nv, a)  # column nv of the width matrix is all ones
            b = np.where(b < 0, nv, b)
            self.terms.append((coef, a, b, float(cost.constant)))
            self.full_value[k] = cost(None)
            varies = [v for v in np.concatenate([a, b]).tolist() if v < nv and self.prunable[v]]
            self.active[k] = bool(varies) and self.full_value[k] > 0
        self.linear_vars = np.where(self.prunable)[0]

    def unit_steps(self, step: int) -> np.ndarray:
        """Per variable, the units that make a multiple of `step` channels: step / gcd(step, per_unit)."""
        return int(step) // np.gcd(int(step), self.per_unit)

    def snap(self, widths: np.ndarray, step: int) -> np.ndarray:
        """Widths (units) rounded up to multiples of `step` channels, capped at the full width."""
        w = np.asarray(widths, dtype=np.float64)
        if step <= 1:
            return w
        unit_step = self.unit_steps(step)
        snapped = np.minimum(np.ceil(w / unit_step) * unit_step, self.full)
        return np.where(self.prunable, snapped, w)

    def layers(self, widths: np.ndarray, step: int = 1) -> np.ndarray:
        """N × L matrix of MACs fractions (columns of inactive layers are all ones)."""
        w = self.snap(np.atleast_2d(widths), step)
        ext = np.hstack([w, np.ones((w.shape[0], 1))])
        out = np.ones((w.shape[0], len(self.terms)))
        for k, (coef, a, b, const) in enumerate(self.terms):
            if self.active[k]:
                out[:, k] = ((ext[:, a] * ext[:, b]) @ coef + const) / self.full_value[k]
        return out

    def linear(self, widths: np.ndarray, step: int = 1) -> np.ndarray:
        """N × P matrix of width fractions of the prunable variables."""
        w = self.snap(np.atleast_2d(widths), step)
        return w[:, self.linear_vars] / self.full[self.linear_vars]


@dataclass
class Candidate:
    """One model form: weighting ('none' | 'relative'), width step, with or without per-variable linear terms."""

    weighting: str
    step: int
    linear: bool

    @property
    def name(self) -> str:
        parts = ["plain" if self.weighting == "none" else "weighted"]
        if self.step > 1:
            parts.append(f"step{self.step}")
        if self.linear:
            parts.append("linear")
        return "+".join(parts)


@dataclass
class Model:
    """A fitted candidate: constant, per-layer coefficients (all layers, 0 for inactive ones), linear terms."""

    candidate: Candidate
    constant: float
    layers: np.ndarray
    linear: np.ndarray  # per entry of Features.linear_vars

    def predict(self, feats: Features, widths: np.ndarray, step: int | None = None) -> np.ndarray:
        step = self.candidate.step if step is None else step
        w = np.atleast_2d(widths)
        pred = self.constant + feats.layers(w, step)[:, feats.active] @ self.layers[feats.active]
        if self.candidate.linear:
            pred = pred + feats.linear(w, step) @ self.linear
        return pred


def design(feats: Features, widths: np.ndarray, cand: Candidate) -> np.ndarray:
    cols = [np.ones((len(widths), 1)), feats.layers(widths, cand.step)[:, feats.active]]
    if cand.linear:
        cols.append(feats.linear(widths, cand.step))
    return np.hstack(cols)


def fit_candidate(feats: Features, widths: np.ndarray, y: np.ndarray, cand: Candidate,
                  sample_weights: np.ndarray | None = None) -> Model:
    """NNLS of y on [1, f_active, (linear)], rows weighted by 1/y for relative error (and by `sample_weights`)."""
    a = design(feats, widths, cand)
    y = np.asarray(y, dtype=np.float64)
    sw = np.ones_like(y) if sample_weights is None else np.asarray(sample_weights, dtype=np.float64)
    scale = sw / y if cand.weighting == "relative" else sw
    x = nnls(a * scale[:, None], y * scale)
    n_act = int(feats.active.sum())
    layers = np.zeros(len(feats.terms))
    layers[feats.active] = x[1:1 + n_act]
    linear = x[1 + n_act:] if cand.linear else np.zeros(len(feats.linear_vars))
    return Model(cand, float(x[0]), layers, linear)


def errors(pred: np.ndarray, y: np.ndarray) -> dict:
    """Relative errors |pred − y| / y: mean, max, median, 90th percentile, count."""
    y = np.asarray(y, dtype=np.float64)
    if y.size == 0:
        return {"n": 0, "mean_rel_error": None, "max_rel_error": None, "median_rel_error": None,
                "p90_rel_error": None}
    rel = np.abs(np.asarray(pred) - y) / y
    return {"n": int(y.size), "mean_rel_error": float(rel.mean()), "max_rel_error": float(rel.max()),
            "median_rel_error": float(np.median(rel)), "p90_rel_error": float(np.percentile(rel, 90))}


def candidates(steps=STEPS) -> list[Candidate]:
    out = [Candidate("none", 1, False)]
    for step in steps:
        for linear in (False, True):
            out.append(Candidate("relative", step, linear))
    return out


def cross_validate(feats: Features, widths: np.ndarray, y: np.ndarray, cand: Candidate, folds: int = 5,
                   seed: int = 0) -> float:
    """Mean relative error of `cand` over k-fold cross-validation (on the training samples only)."""
    n = len(y)
    if n < 2 * folds:
        folds = max(2, n // 2)
    order = np.random.default_rng(seed).permutation(n)
    rel = []
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        model = fit_candidate(feats, widths[train], y[train], cand)
        rel.append(np.abs(model.predict(feats, widths[test]) - y[test]) / y[test])
    return float(np.concatenate(rel).mean())


@dataclass
class FitResult:
    model: Model  # the chosen candidate refitted on every sample
    holdout: dict  # the chosen candidate fitted on the training split, on the held-out split
    train: dict
    bilinear_holdout: dict  # the same fit evaluated without snapping (what the projection sees off the grid)
    variants: dict  # candidate name -> {"cv": ..., "holdout": ...}
    split: dict


def split(kinds: list[str], seed: int, holdout: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Anchors always train; a `holdout` fraction of the random samples is held out (deterministic)."""
    kinds = list(kinds)
    random_idx = np.array([i for i, k in enumerate(kinds) if k == "random"], dtype=np.int64)
    anchors = np.array([i for i, k in enumerate(kinds) if k != "random"], dtype=np.int64)
    perm = np.random.default_rng([seed, 80, 20]).permutation(random_idx)
    n_test = int(round(holdout * len(perm))) if len(perm) >= 5 else 0
    test = np.sort(perm[:n_test])
    train = np.sort(np.concatenate([anchors, perm[n_test:]]))
    return train, test


def fit_profile(feats: Features, widths: np.ndarray, y: np.ndarray, kinds: list[str], seed: int = 0,
                steps=STEPS, only: Candidate | None = None) -> FitResult:
    """Choose a candidate by cross-validation on the training split, report it (and every candidate) on the
    held-out split, and refit the chosen one on all samples."""
    widths = np.asarray(widths, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(y) < 2:
        raise ValueError("need at least two samples to fit")
    train, test = split(kinds, seed)
    cands = [only] if only is not None else candidates(steps)
    variants = {}
    best, best_cv = None, np.inf
    for cand in cands:
        cv = cross_validate(feats, widths[train], y[train], cand, seed=seed) if len(train) >= 4 else np.nan
        info = {"cv_mean_rel_error": cv}
        if len(test):
            m = fit_candidate(feats, widths[train], y[train], cand)
            info["holdout"] = errors(m.predict(feats, widths[test]), y[test])
        variants[cand.name] = info
        if best is None or (np.isfinite(cv) and cv < best_cv - 1e-12):
            best, best_cv = cand, cv
    m_train = fit_candidate(feats, widths[train], y[train], best)
    holdout = errors(m_train.predict(feats, widths[test]), y[test])
    bilinear = errors(m_train.predict(feats, widths[test], step=1), y[test])
    train_err = errors(m_train.predict(feats, widths[train]), y[train])
    model = fit_candidate(feats, widths, y, best)
    return FitResult(model, holdout, train_err, bilinear, variants,
                     {"train": len(train), "holdout": len(test), "seed": seed})
