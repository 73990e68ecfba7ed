"""The solvers that train a grid of heads, by name (`SOLVERS`), and full-batch L-BFGS for a whole grid of
multinomial logistic-regression heads at once.

Every head minimises scikit-learn's objective ``C·Σ CE + ½‖W‖²`` (intercept unpenalised), i.e.
``mean CE + λ/2 ‖W‖²`` with ``λ = 1/(C·n)``, so a head equals ``LogisticRegression(C=C)``.
What makes a grid fast:

- heads of one feature combination share X, so one matmul gives every head's logits;
- each head runs its own L-BFGS (own history, own step, own stop) in one batched loop;
- each head is preconditioned by ``(G/K + λI)^(-1/2)`` (G the centred feature covariance, K the
  classes: the Hessian at the start), applied as a diagonal in G's eigenbasis, so that one
  eigendecomposition per combination serves all its heads. It is an exact change of variables (the
  optimum is the same) that takes far fewer iterations on anisotropic features, as ViT features are.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..progress import progress as progress_bar
from ..settings import Training
from ..settings.choices import BY_C
from .data import ProbeError, Split, StreamedSplit
from .head import Head
from .minibatch import train_heads

log = logging.getLogger("regcache")


def lbfgs_heads(train: "Split | StreamedSplit", num_classes: int, s: Training, progress: bool = False) -> list:
    """One head per (combination, C) of ``s``, each combination's grid in one solve."""
    if isinstance(train, StreamedSplit):
        raise ProbeError("lbfgs is full-batch: it needs the training set in memory (drop --stream)")
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ProbeError("lbfgs runs in one process (on one GPU with --device cuda); run it without torchrun")
    device = torch.device(s.device)
    y = torch.from_numpy(train.labels).to(device)
    heads = []
    for combo in s.features:
        x = train.combo(combo).to(device)
        w, b, iters = lbfgs_grid(x, y, num_classes, s.C, max_iter=s.max_iter, tol=s.tol)
        heads += [Head(combo, float("nan"), 1.0 / (c * len(y)), w[i].cpu(), b[i].cpu(), C=float(c),
                       iterations=int(iters[i])) for i, c in enumerate(s.C)]
        del x
    return heads


def sklearn_heads(train: "Split | StreamedSplit", num_classes: int, s: Training, progress: bool = False) -> list:
    """One head per (combination, C): scikit-learn's ``LogisticRegression(C, tol, max_iter)`` (lbfgs, float64, on the
    CPU), fitted one after another as DINOv3's logistic-regression evaluation fits them, so that its heads, where
    they stop at the iteration cap short of the optimum, are DINOv3's. A class absent from the training rows
    gets a bias that no logit of another class is below (it is never predicted, as scikit-learn never does)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression


    if isinstance(train, StreamedSplit):
        raise ProbeError("sklearn is full-batch: it needs the training set in memory (drop --stream)")
    y = train.labels
    heads = []
    bar = progress_bar(total=len(s.features) * len(s.C), desc="sklearn fits", unit="fit", disable=not progress)
    for combo in s.features:
        x = train.combo(combo).double().numpy()
        for c in s.C:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # DINOv3's heads stop at the cap too
                m = LogisticRegression(C=c, tol=s.tol, max_iter=s.max_iter).fit(x, y)
            w, b = np.zeros((num_classes, x.shape[1])), np.full(num_classes, -1e4)
            if len(m.classes_) == 2:  # scikit-learn's binary form: one vector for class 1 against class 0
                w[m.classes_[1]], b[m.classes_[1]], b[m.classes_[0]] = m.coef_[0], m.intercept_[0], 0.0
            else:
                w[m.classes_], b[m.classes_] = m.coef_, m.intercept_
            heads.append(Head(combo, float("nan"), 1.0 / (c * len(y)), torch.from_numpy(w).float(),
                              torch.from_numpy(b).float(), C=float(c), iterations=int(m.n_iter_[0])))
            bar.update(1)
    bar.close()
    return heads


#: solver name (`settings.choices.SOLVERS`) -> (training set, classes, settings, progress) -> every head of the grid
SOLVERS: dict[str, Callable[..., list[Head]]] = {"minibatch": train_heads, "lbfgs": lbfgs_heads,
                                                  "sklearn": sklearn_heads}


def fit_heads(train: "Split | StreamedSplit", num_classes: int, s: Training, progress: bool = False) -> list[Head]:
    """Every head of ``s`` with its solver, in combination-major grid order."""
    return SOLVERS[s.solver](train, num_classes, s, progress)


def refit(chosen: dict[tuple[str, ...], Head], train: "Split | StreamedSplit", val: Split, num_classes: int,
          s: Training) -> dict[tuple[str, ...], Head]:
    """Train each combination's chosen setting again on train + val (DINOv3): the selection used val,
    the final head may learn from it too. Each refit head keeps the chosen head's validation accuracy."""
    if isinstance(train, StreamedSplit):
        raise ProbeError("refit needs the training set in memory (drop --stream)")
    both = Split(f"{train.name}+{val.name}", {f: np.concatenate([train.x[f], val.x[f]]) for f in train.x},
                 np.concatenate([train.labels, val.labels]), np.concatenate([train.keys, val.keys]),
                 np.concatenate([train.views, val.views]))
    out = {}
    for combo, h in chosen.items():
        setting = {"C": [h.C]} if s.solver in BY_C else {"lr": [h.lr], "wd": [h.wd]}
        new = fit_heads(both, num_classes, s.model_copy(update={"features": [combo], "refit": False, **setting}))[0]
        new.val_acc = h.val_acc
        out[combo] = new
    return out


def lbfgs_grid(x: torch.Tensor, y: torch.Tensor, num_classes: int, Cs: Sequence[float], *, max_iter: int = 1000,
               tol: float = 1e-4, history: int = 10, max_logits_bytes: int = 1 << 28, chunk_rows: int = 16384
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit one head per C on ``x`` [n, d] (the matmuls run in its dtype, on its device) and labels ``y`` [n].

    Returns weights [H, K, d] and biases [H, K] in ``x``'s dtype, and the iterations each head took. The
    weights, the L-BFGS state, the objective and the gradient are float64: each chunk's matmul runs in
    ``x``'s dtype (float32: fast) over at most ``chunk_rows`` rows, and the chunks are summed in float64, so
    that a weakly regularised head (C = 1e5) sees its progress far below float32's resolution of the sum.
    A head stops when every gradient entry of the mean objective is ≤ ``tol`` (scikit-learn's ``tol``, its
    L-BFGS ``gtol``), when the objective stops decreasing at float64 precision (its ``ftol``, 64 eps), when
    its line search finds no decrease, or after ``max_iter`` iterations.
    """
    n, d = x.shape
    k, dev, dt, acc = num_classes, x.device, x.dtype, torch.float64
    lam = torch.tensor([1.0 / (c * n) for c in Cs], dtype=acc, device=dev)
    heads = len(lam)
    curv = 1.0 / k   # the softmax curvature at W = 0, per class
    mu, basis, scale = _preconditioner(x, lam.to(dt), curv, max_logits_bytes)
    basis, scale = basis.to(acc), scale.to(acc)
    chunk = max(256, min(chunk_rows, max_logits_bytes // (heads * k * 8)))
    xr = x - mu  # centring is exact (the intercept absorbs it) and decouples W from the intercept
    for s in range(0, n, chunk):  # rotate into the covariance's eigenbasis, in place, a chunk at a time
        xr[s:s + chunk] = xr[s:s + chunk] @ basis.to(dt)
    bscale = 1.0 / math.sqrt(curv)  # b = bscale * beta, for the same reason
    p = d * k + k

    def evaluate(theta: torch.Tensor, idx: torch.Tensor):
        """Objective, its gradient in the solver's variables, and the largest gradient entry in (W, b)."""
        h = len(idx)
        z, beta = theta[:, :d * k].view(h, d, k), theta[:, d * k:]
        w, b = scale[idx].unsqueeze(2) * z, beta * bscale                # [h, d, k], [h, k]
        wf = w.permute(1, 0, 2).reshape(d, h * k).to(dt)
        loss = torch.zeros(h, dtype=acc, device=dev)
        gw = torch.zeros(d, h * k, dtype=acc, device=dev)
        gb = torch.zeros(h, k, dtype=acc, device=dev)
        for s in range(0, n, chunk):
            xs, ys = xr[s:s + chunk], y[s:s + chunk]
            logits = (xs @ wf).view(len(ys), h, k).to(acc).add_(b)
            lse = torch.logsumexp(logits, 2)                            # [r, h]
            rows = torch.arange(len(ys), device=dev)
            loss += (lse - logits[rows, :, ys]).sum(0)
            prob = logits.sub_(lse.unsqueeze(2)).exp_()                 # softmax, in place
            prob[rows, :, ys] -= 1.0
            gw += (xs.T @ prob.view(len(ys), h * k).to(dt)).to(acc)
            gb += prob.sum(0)
        lam_h = lam[idx]
        gw = gw.view(d, h, k).permute(1, 0, 2).div(n).add_(lam_h.view(h, 1, 1) * w)
        gb = gb.div_(n)
        loss = loss / n + 0.5 * lam_h * w.square().sum((1, 2))
        gmax = torch.maximum(gw.abs().amax((1, 2)), gb.abs().amax(1))
        grad = torch.cat([(scale[idx].unsqueeze(2) * gw).flatten(1), gb * bscale], 1)
        return loss, grad, gmax

    theta = torch.zeros(heads, p, dtype=acc, device=dev)
    f, g, gmax = evaluate(theta, torch.arange(heads, device=dev))
    iters = torch.zeros(heads, dtype=torch.long, device=dev)
    live = (gmax > tol).nonzero().squeeze(1)  # the heads still running; their L-BFGS history, compacted to them
    s_hist = torch.zeros(history, len(live), p, dtype=acc, device=dev)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(history, len(live), dtype=acc, device=dev)
    ftol = 64 * torch.finfo(acc).eps
    for it in range(max_iter):
        if not len(live):
            break
        th, gr, fa = theta[live], g[live], f[live]
        direction = -_two_loop(gr, s_hist, y_hist, rho, it, history)
        slope = (gr * direction).sum(1)
        bad = slope >= 0  # not a descent direction (lost curvature): restart that head from -g
        if bad.any():
            direction[bad], slope[bad] = -gr[bad], -(gr[bad] ** 2).sum(1)
            rho[:, bad] = 0
        new_th, new_f, new_g, new_gmax = _line_search(evaluate, live, th, fa, direction, slope)
        moved = torch.isfinite(new_f)   # heads whose line search failed keep their point and stop
        step, dg = new_th - th, new_g - gr
        sy = (step * dg).sum(1)
        slot = it % history
        keep = moved & (sy > 1e-10 * dg.square().sum(1))
        s_hist[slot], y_hist[slot] = step, dg
        rho[slot] = torch.where(keep, 1.0 / sy.where(keep, torch.ones_like(sy)), torch.zeros_like(sy))
        upd = live[moved]
        theta[upd], g[upd], gmax[upd], f[upd] = new_th[moved], new_g[moved], new_gmax[moved], new_f[moved]
        stalled = (fa - new_f) <= ftol * torch.maximum(torch.maximum(fa.abs(), new_f.abs()), torch.ones_like(fa))
        iters[live] += 1
        going = moved & ~stalled & (new_gmax > tol)
        if not going.all():  # compact the state to the heads still running: no copy of it per iteration
            live, s_hist, y_hist, rho = live[going], s_hist[:, going], y_hist[:, going], rho[:, going]
    active = torch.zeros(heads, dtype=torch.bool, device=dev)
    active[live] = True
    if active.any():
        log.warning("lbfgs: %d of %d heads (C = %s) reached --iterations %d before the gradient tolerance %g",
                    int(active.sum()), heads, ", ".join(f"{Cs[i]:g}" for i in active.nonzero().squeeze(1).tolist()),
                    max_iter, tol)
    z, beta = theta[:, :d * k].view(heads, d, k), theta[:, d * k:]
    w = torch.einsum("ed,hdk->hek", basis, scale.unsqueeze(2) * z)     # back from the eigenbasis: [H, d, k]
    b = beta * bscale - torch.einsum("d,hdk->hk", mu.to(acc), w)         # undo the centring
    return w.mT.contiguous().to(dt), b.to(dt), iters


def _preconditioner(x: torch.Tensor, lam: torch.Tensor, curv: float, chunk_bytes: int):
    """The feature mean, the eigenbasis of the centred covariance G, and per head the diagonal
    ``(curv·(e + ē) + λ)^(-1/2)`` in that basis (``e`` G's eigenvalues, ``ē`` their mean).

    ``W = basis · (scale ⊙ Z)`` is an exact change of variables. Without ``ē`` it is the Hessian at the start
    (Hessian ≈ I there), which whitens the features: right for a strongly regularised head, wrong for a weak
    one, whose curvature at its optimum lies on the few rows near the boundary, so that whitening amplifies
    directions it does not need (on the demo's ViT-S/14 [CLS], C = 1e5 ran 1,000 iterations 3% above the
    optimum). The ridge ``ē`` keeps the rotation and damps the whitening: the DINOv3 grid of 45 C converges
    in at most ~370 iterations a head (BENCHMARKS.md, "Probe")."""
    n, d = x.shape
    mu = x.mean(0)
    gram = torch.zeros(d, d, dtype=x.dtype, device=x.device)
    rows = max(1024, chunk_bytes // (d * x.element_size()))
    for s in range(0, n, rows):
        xs = x[s:s + rows] - mu
        gram.addmm_(xs.T, xs)
    e, basis = _eigh(gram.div_(n))
    e = e.clamp_min(1e-6 * float(e.mean().clamp_min(torch.finfo(x.dtype).tiny)))  # directions without variance
    return mu, basis, (curv * (e + e.mean()).unsqueeze(0) + lam.unsqueeze(1)).rsqrt()


def _eigh(a: torch.Tensor):
    """``torch.linalg.eigh``, on one CPU thread: its tridiagonal reduction is memory-bound, and on a busy
    2-core machine a second thread made it 2-6x slower (1.8 s vs 4-12 s at d = 2048)."""
    if a.device.type != "cpu":
        return torch.linalg.eigh(a)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(a)
    finally:
        torch.set_num_threads(threads)


def _two_loop(grad, s_hist, y_hist, rho, it: int, history: int) -> torch.Tensor:
    """L-BFGS two-loop recursion for every head at once (heads without an update in a slot have rho 0)."""
    q = grad.clone()
    slots = [(it - 1 - j) % history for j in range(min(it, history))]   # newest first
    alphas = []
    for j in slots:
        a = rho[j] * (s_hist[j] * q).sum(1)
        q -= a.unsqueeze(1) * y_hist[j]
        alphas.append(a)
    if slots:
        j = slots[0]
        yy = y_hist[j].square().sum(1)
        gamma = torch.where(rho[j] > 0, 1.0 / (rho[j] * yy).clamp_min(torch.finfo(q.dtype).tiny), torch.ones_like(yy))
        q *= gamma.unsqueeze(1)
    for j, a in zip(reversed(slots), reversed(alphas)):
        bta = rho[j] * (y_hist[j] * q).sum(1)
        q += (a - bta).unsqueeze(1) * s_hist[j]
    return q


def _line_search(evaluate, idx, theta, f0, direction, slope, c1: float = 1e-4, shrink: float = 0.5, tries: int = 6):
    """Backtracking from step 1 per head until the Armijo condition holds; heads that never satisfy it within
    ``tries`` steps (step 1 halved 5 times: the objective at its noise floor) get f = inf (and stop)."""
    h = len(idx)
    t = torch.ones(h, dtype=theta.dtype, device=theta.device)
    new_th, new_g = theta.clone(), torch.zeros_like(theta)
    new_f = torch.full_like(f0, float("inf"))
    new_gmax = torch.full_like(f0, float("inf"))
    pending = torch.ones(h, dtype=torch.bool, device=theta.device)
    for _ in range(tries):
        sel = pending.nonzero().squeeze(1)
        if not len(sel):
            break
        trial = theta[sel] + t[sel].unsqueeze(1) * direction[sel]
        f, g, gmax = evaluate(trial, idx[sel])
        ok = torch.isfinite(f) & (f <= f0[sel] + c1 * t[sel] * slope[sel])
        acc = sel[ok]
        new_th[acc], new_f[acc], new_g[acc], new_gmax[acc] = trial[ok], f[ok], g[ok], gmax[ok]
        pending[acc] = False
        t[sel[~ok]] *= shrink
    return new_th, new_f, new_g, new_gmax
