"""Choosing int4 values better than round-to-nearest, for any layout of ``w ≈ (code - zero) * scale``.

Two steps, both optional and both layout-agnostic (a format passes ``round_scale``, which maps a scale to
the nearest one its storage can hold, so every candidate is judged as it will be dequantized):

- :func:`search_scale_zero`: per group, try shrunken [min, max] ranges (clipping a few outliers often
  lowers the error of all the other weights), then refit the scale by least squares for the chosen codes;
  keep whichever has the least (importance-weighted) squared error. Data-free when ``importance`` is None.
- :func:`gptq_codes`: GPTQ (Frantar et al. 2022) with fixed ("static") group parameters: codes are chosen
  one input column at a time and each column's rounding error is pushed onto the columns not yet rounded,
  weighted by the inverse of the calibration Hessian ``H = E[x x^T]``. Static groups let the columns run
  in decreasing ``diag(H)`` order (act-order) while groups stay contiguous in the saved layout.

Measured on all-MiniLM-L6-v2 (239 sentences, mean cosine vs fp32), group 64: round-to-nearest 0.967,
search 0.971, search weighted by diag(H) 0.974, + GPTQ (32 calibration sentences, damp 0.1) 0.986.

What else was tried for int4c group 64 (issue 15; same benchmark, every linear, 1 thread):

- an exhaustive search (scale codes -16..+8 around the chosen one x zero-points +-2 per group): weight error
  -1% (334 -> 331 summed over the model), mean cosine 0.9705 (no gain): the 4 shrinks + refit are at the
  layout's optimum for squared error;
- HQQ's sparsity-promoting lp objective instead of squared error (p = 0.7 / 1 / 1.5 / 3): 0.9648 / 0.9688 /
  0.9709 / 0.9696: outliers left unfit cost more than they save; squared error stays;
- importance from the weights alone (columns' std^-b, b = 0.5..2, standing in for diag(H)): 0.9706-0.9710;
- :func:`column_scales` (SINQ's two-axis balancing; the row axis is what int4c's row scale already is):
  0.9759 data-free, 0.9876 with GPTQ (against ``t H t``), for 16 more bits per input column (4.24 bits/param
  on MiniLM). The only new degree of freedom that paid; it needs ``x * t`` on the activations at run time:
  the ``int4cs`` format (:mod:`.int4cs`) stores it, and ``Backend.linear`` applies it before any kernel.
  Once rows and columns are balanced, a 4-bit group-scale code loses nothing measurable (group 64: 0.9761 vs
  0.9759 with 8 bits), so int4cs spends one byte per group and affords group 32: 0.9811 at 4.29 bits/param.
  Why it works here: a column's weight spread anti-correlates with its input's mean square (log-log
  correlation -0.7 to -0.9 on MiniLM's MLP-up inputs, +0.2 to -0.8 on QKV), so evening the columns spends
  precision on the hot inputs. With group 32 on the last two blocks' QKV and MLP-up: 0.9784 at 4.28; group 32
  everywhere 0.9811 at 4.43; group 128 0.9716. Cost: 5 s per 4096 x 4096 weight on one shared thread (int4c's
  search: 7.7 s). A diag(H)^-1/4 column scale (AWQ-like, calibrated) without GPTQ: 0.9798; with GPTQ 0.9863
  (SINQ's is better). In the budget planner's calibrated plans, SINQ on their int4c layers: 0.9897 at 4.29
  bits/param (plan for 4.3; without: 0.9881) and 0.9938 at 4.99 (plan for 5.0 with int4c:32; without: 0.9932);
- least-squares refits after GPTQ against the full H (group scales, then column scales): +0.0002 to +0.0003;
- a non-uniform 16-level grid per layer (HIGGS/MSB-style, Lloyd-Max from NF4's table, without their rotation),
  per-group absmax and a least-squares scale: 0.9727; with the SINQ column scale 0.9779. Not affine: torch's
  int4 kernels cannot run it (nf4 at 4.5 bits: 0.9731).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from .base import Reduce

ScaleRounder = Callable[[torch.Tensor], torch.Tensor]

MIN_SCALE = 2.0 ** -24  # smallest positive fp16: an all-zero group still divides safely
# (shrink of the negative end, shrink of the positive end), from no clipping to 24% clipped. On MiniLM these
# 4 symmetric candidates scored the same as a 5 x 5 grid of independent shrinks (0.9709 vs 0.9706 data-free,
# 0.9860 vs 0.9863 with GPTQ) at a sixth of the candidates.
DEFAULT_SHRINKS: Tuple[Tuple[float, float], ...] = ((1.0, 1.0), (0.92, 0.92), (0.84, 0.84), (0.76, 0.76))
COLUMN_SCALE_STEPS = 4  # Sinkhorn rounds of column_scales; MiniLM data-free: 1: 0.9751, 2: 0.9760, 4: 0.9761, 8: 0.9760
REFINE_STEPS = 2  # least-squares rescaling rounds per candidate; a third changed nothing measurable


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (torch.round(w / scale[..., None]) + zero[..., None]).clamp_(0, 15)


def _weighted_error(w3, scale, zero, weight) -> torch.Tensor:
    """sum over each group of weight * (w - dequantized)^2, in one temporary (in-place steps: this is the hot loop)."""
    s, z = scale[..., None], zero[..., None]
    t = torch.div(w3, s).round_().add_(z).clamp_(0, 15).sub_(z).mul_(s).sub_(w3).square_()
    if weight is not None:
        t.mul_(weight)
    return t.sum(-1)


def rtn_scale_zero(w3: torch.Tensor, round_scale: ScaleRounder) -> Tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters: the grid spans [min(w, 0), max(w, 0)] so 0 is exact. ``w3`` is [n, G, g]."""
    wmin = w3.amin(dim=-1).clamp(max=0.0)
    wmax = w3.amax(dim=-1).clamp(min=0.0)
    scale = round_scale(((wmax - wmin) / 15.0).clamp(min=MIN_SCALE))
    return scale, torch.round(-wmin / scale).clamp_(0, 15)


def largest_group_scale(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [n, 1]: each row's largest round-to-nearest group scale, as float16 holds it: the row reference that
    int4c's and int4cs's group-scale codes are relative to."""
    n, k = weight.shape
    w3 = weight.detach().float().reshape(n, k // group_size, group_size)
    span = w3.amax(dim=-1).clamp(min=0.0) - w3.amin(dim=-1).clamp(max=0.0)
    return (span.amax(dim=1, keepdim=True) / 15.0).clamp(min=MIN_SCALE).half().float()


def search_scale_zero(w3: torch.Tensor, round_scale: ScaleRounder, importance: Optional[torch.Tensor] = None,
                      shrinks: Sequence[Tuple[float, float]] = DEFAULT_SHRINKS,
                      refine: int = REFINE_STEPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) with the least importance-weighted squared error; ``w3`` is [n, G, g] float32,
    ``importance`` [G, g] (e.g. the calibration inputs' mean square per input column) or None (all equal).

    Every shrink candidate is scored, then the winner's scale is refit by least squares ``refine`` times
    (kept only where it lowers the error). Peak extra memory: about two float32 copies of the weight.
    """
    weight = None if importance is None else importance.to(w3.dtype)
    wmin = w3.amin(dim=-1).clamp(max=0.0)
    wmax = w3.amax(dim=-1).clamp(min=0.0)
    best_err = best_scale = best_zero = None
    for lo, hi in shrinks:
        scale = round_scale(((wmax * hi - wmin * lo) / 15.0).clamp(min=MIN_SCALE))
        zero = torch.round(-wmin * lo / scale).clamp_(0, 15)
        err = _weighted_error(w3, scale, zero, weight)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    for _ in range(refine):  # least squares for the chosen codes d = code - zero: scale = <w, d>_h / <d, d>_h
        d = _codes(w3, best_scale, best_zero).sub_(best_zero[..., None])
        hd = d if weight is None else d * weight
        fit = (hd * w3).sum(-1) / (hd * d).sum(-1).clamp(min=1e-30)
        del d, hd
        fit = round_scale(fit.clamp(min=MIN_SCALE))
        fit_err = _weighted_error(w3, fit, best_zero, weight)
        better = fit_err < best_err
        best_scale, best_err = torch.where(better, fit, best_scale), torch.where(better, fit_err, best_err)
    return best_scale, best_zero


_MOMENT_ROWS = 256  # rows widened to float64 at a time by the column-scale passes (8 MiB at 4096 columns)


def _column_moments(w: torch.Tensor, inv_r: torch.Tensor) -> torch.Tensor:
    """float64 [2, k]: sum over rows of ``w_ij * inv_r_i`` and of its square (this rank's rows). Products and sums in
    float64, a few rows at a time (matrix-vector products: no full-size temporaries)."""
    out = torch.zeros(2, w.shape[1], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[0], _MOMENT_ROWS):
        part = w[start:start + _MOMENT_ROWS].double()
        factor = inv_r[start:start + _MOMENT_ROWS]
        out[0] += factor @ part
        out[1] += factor.square() @ part.square_()
    return out


def _row_moments(w: torch.Tensor, inv_c: torch.Tensor) -> torch.Tensor:
    """float64 [2, n]: sum over this rank's columns of ``w_ij * inv_c_j`` and of its square, a few rows at a time."""
    out = torch.empty(2, w.shape[0], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[0], _MOMENT_ROWS):
        part = w[start:start + _MOMENT_ROWS].double()
        out[0, start:start + part.shape[0]] = part @ inv_c
        out[1, start:start + part.shape[0]] = part.square_() @ inv_c.square()
    return out


def _std(moments: torch.Tensor, count: float) -> torch.Tensor:
    """The (unbiased) standard deviation from float64 [2, m] sums of values and squares over ``count`` values."""
    return ((moments[1] - moments[0].square() / count) / max(count - 1, 1)).clamp(min=0).sqrt()


def column_scales(weight: torch.Tensor, steps: int = COLUMN_SCALE_STEPS, *, rows_reduce: Optional[Reduce] = None,
                  columns_reduce: Optional[Reduce] = None) -> torch.Tensor:
    """float32 [k] per-input-column scales ``t`` (geometric mean 1) that balance ``weight`` [n, k] (SINQ, Müller et al.
    2025): ``weight / t`` has columns and rows of more even spread, and ``weight ≈ Q(weight / t) * t``.

    Sinkhorn-Knopp on standard deviations, in the log domain: alternately divide every column, then every row, by its
    standard deviation; keep the column factors of the iterate whose largest-to-smallest std ratio (over rows and
    columns) is least. Row factors are not returned: a grouped format's own row/group scales absorb them. Applying
    ``t`` needs ``x * t`` on the activations at run time (the matmul then uses ``weight / t``'s codes).

    Model-parallel shards of one weight get the whole weight's ``t`` (their part of it): ``rows_reduce`` when each
    rank holds some rows (SAT's column-parallel shards: column sums are combined), ``columns_reduce`` when each
    holds some columns (row-parallel: row sums and the geometric mean are combined); the score is combined either
    way. The passes run in float64 a few rows at a time (no full-size temporaries), so the sharding changes ``t`` by
    float64 rounding only, far below what a stored code resolves.
    """
    w = weight.detach().float()
    shared = rows_reduce or columns_reduce

    def total(t: torch.Tensor, reduce: Optional[Reduce], op: str = "sum") -> torch.Tensor:
        return t if reduce is None else reduce(t, op)

    def count(m: int, reduce: Optional[Reduce]) -> float:
        return float(total(torch.tensor([float(m)], dtype=torch.float64, device=w.device), reduce)[0])

    rows_total, cols_total = count(w.shape[0], rows_reduce), count(w.shape[1], columns_reduce)
    if rows_total < 2:  # one row has no column spread
        return torch.ones(w.shape[1], device=w.device)

    def extremes(values: torch.Tensor) -> torch.Tensor:  # (max, -min) over every rank's live values
        if values.numel() == 0:
            pair = torch.tensor([-float("inf"), -float("inf")], dtype=torch.float64, device=w.device)
        else:
            pair = torch.stack([values.max(), -values.min()])
        return total(pair, shared, "max")

    log_c = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
    log_r = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    # the iterate's row spreads: the weight's own, 1 once rows are divided
    rows = _std(total(_row_moments(w, torch.ones_like(log_c)), columns_reduce), cols_total)
    live_rows = rows > 0  # constant rows and columns (all-zero ones) keep factor 1 and are left out of the score
    best, best_c = float("inf"), log_c
    for step in range(steps + 1):
        # std of a column of w / (r c) is c_j^-1 * std(w / r): two passes over the weight per step
        cols = _std(total(_column_moments(w, (-log_r).exp()), rows_reduce), rows_total) * (-log_c).exp()
        live_cols = cols > 0
        col_hi, col_lo = extremes(cols[live_cols]).tolist()
        row_hi, row_lo = extremes(rows[live_rows]).tolist()
        hi, lo = max(col_hi, row_hi), -max(col_lo, row_lo)
        if hi == -float("inf"):  # nothing live anywhere
            break
        score = hi / lo
        if score < best:
            best, best_c = score, log_c.clone()
        if step == steps:
            break
        log_c = log_c + torch.where(live_cols, cols, torch.ones_like(cols)).log()
        row_std = _std(total(_row_moments(w, (-log_c).exp()), columns_reduce), cols_total) * (-log_r).exp()
        log_r = log_r + torch.where(row_std > 0, row_std, torch.ones_like(row_std)).log()
        rows = torch.ones_like(rows)
    mean = float(total(best_c.sum().reshape(1), columns_reduce)[0]) / cols_total
    return (best_c - mean).exp().float()


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, scale: torch.Tensor,
               zero: torch.Tensor, *, damp: float = 0.1, act_order: bool = True, block: int = 128) -> torch.Tensor:
    """[n, k] uint8 codes 0..15 for ``weight`` [n, k] with fixed per-group ``scale``/``zero`` [n, k/g].

    ``hessian`` [k, k] is ``E[x x^T]`` of the layer's inputs. ``damp`` adds that fraction of the mean diagonal
    to the diagonal: with few calibration tokens H is (near) singular; 0.1 scored best on MiniLM with 32
    sentences (0.03: 0.985, 0.1: 0.986, 0.3: 0.986, and fewer bad sentences than 0.03).
    """
    n, k = weight.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) <= 0  # columns never seen active: no error feedback from or to them
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k)
    h = h[perm][:, perm]
    h.diagonal().add_(damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # transposed [k, n]: one input column is one contiguous row, which the column loop reads and updates
    wt = weight.detach().float().t()[perm].contiguous()
    group_of = perm // group_size  # the group each (permuted) column belongs to in the saved layout
    col_scale = scale.float().t()[group_of].contiguous()  # [k, n]
    col_zero = zero.float().t()[group_of].contiguous()
    codes = torch.empty(k, n, dtype=torch.uint8)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = wt[b0:b1]
        errs = torch.empty_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            s, z = col_scale[b0 + j], col_zero[b0 + j]
            q = torch.div(wb[j], s).round_().add_(z).clamp_(0, 15)
            codes[b0 + j] = q.to(torch.uint8)
            e = q.sub_(z).mul_(s).neg_().add_(wb[j]).div_(hb[j, j])  # (w - dequantized) / hinv[j, j]
            wb[j + 1:].addr_(hb[j, j + 1:], e, alpha=-1.0)
            errs[j] = e
        if b1 < k:
            wt[b1:].addmm_(hinv[b0:b1, b1:].t(), errs, alpha=-1.0)
    out = torch.empty_like(codes)
    out[perm] = codes
    return out.t().contiguous()


def choose_int4(weight: torch.Tensor, group_size: int, round_scale: ScaleRounder, *,
                hessian: Optional[torch.Tensor] = None, search: bool = False, damp: float = 0.1,
                act_order: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [n, k], scale [n, G], zero [n, G]) for ``weight`` [n, k]: GPTQ over importance-weighted
    searched parameters when a ``hessian`` is given, searched parameters when ``search``, else round-to-nearest."""
    n, k = weight.shape
    g = k // group_size
    w3 = weight.detach().float().reshape(n, g, group_size)
    if hessian is not None:
        importance = torch.diag(hessian).float().clamp(min=0).reshape(g, group_size)
        scale, zero = search_scale_zero(w3, round_scale, importance)
        codes = gptq_codes(weight, hessian, group_size, scale, zero, damp=damp, act_order=act_order)
        return codes, scale, zero
    scale, zero = search_scale_zero(w3, round_scale) if search else rtn_scale_zero(w3, round_scale)
    return _codes(w3, scale, zero).to(torch.uint8).reshape(n, k), scale, zero
