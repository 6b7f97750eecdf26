"""Surrogates from head masks to (bias, log-perplexity), behind one signature and a registry.

Every registered surrogate (:data:`SURROGATES`, ``--surrogate``) follows scikit-learn's
estimator rules: ``__init__`` stores parameters, ``fit(data)`` takes a :class:`TrainingSet`
and returns self, learned state ends in ``_``, ``predict_torch(bits)`` gives (bias,
log-perplexity) and never refits, ``metrics(data)`` reports held-out accuracy on masks the
fitted model did not see. Adding one is a class decorated by :func:`register_surrogate`.

- ``additive`` (:class:`AdditiveSurrogate`): head effects on the measure's bucket means and
  on log-perplexity that add up (knockouts give them directly).
- ``mlp`` (the paper's) and ``ridge``: one regressor per target on the mask bits
  (:class:`TargetwiseSurrogate` over :class:`MLPSurrogate`, N -> 256 -> 128 -> 1, ReLU, MSE,
  Adam with weight decay, standardised targets, early stopping, inputs = pruned-head
  indicators; or :class:`RidgeSurrogate`, the linear reference). ``holdout_metrics``
  reports MSE, R^2 and Spearman (scikit-learn's K-fold split).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from attnprune.registry import Registry


@dataclass
class TrainingSet:
    """What every surrogate fits on: evaluated masks and their measurements (row ``i`` = one mask).

    ``bits [M, N]`` (1 = active), ``bias [M]``, ``log_ppl [M]``. For measures with bucket
    means, ``summaries [M, B]`` and ``statistic(means [..., B] tensor) -> bias`` (else
    ``summaries`` is the bias as one column and ``statistic`` picks it); ``summary_var
    [M, B]`` each row's sampling variance of its shift from the unrepaired model, ``prior
    [N, B]`` independent estimates of every head's shift (both optional). ``inside [M]``
    marks masks whose measured perplexity met the budget (for the metrics). ``log_ppl_var
    [M]`` and ``log_ppl_prior [N]`` do for log-perplexity what ``summary_var`` and
    ``prior`` do for the summaries (both optional).
    """

    bits: np.ndarray
    bias: np.ndarray
    log_ppl: np.ndarray
    summaries: np.ndarray | None = None
    statistic: Callable | None = None
    summary_var: np.ndarray | None = None
    prior: np.ndarray | None = None
    inside: np.ndarray | None = None
    seed: int = 0
    log_ppl_var: np.ndarray | None = None  # [M] sampling variance of each row's log-perplexity change
    log_ppl_prior: np.ndarray | None = None  # [N] independent estimate of every head's log-perplexity effect

    @property
    def pruned(self) -> np.ndarray:
        """``[M, N]`` pruned-head indicators."""
        return 1 - self.bits


SURROGATES = Registry("surrogate")
register_surrogate = SURROGATES.register  # class decorator: make a surrogate available as ``--surrogate name``


def surrogate_names() -> list[str]:
    """Registered surrogate names, in registration order."""
    return SURROGATES.names()


def make_surrogate(name: str, shrink: bool = True, seed: int = 0):
    """A new, unfitted surrogate ``name`` (each takes the options it uses)."""
    return SURROGATES[name].from_options(shrink=shrink, seed=seed)


class MLPSurrogate:
    """Small MLP regressor on mask bits (see module docstring)."""

    def __init__(self, hidden: tuple[int, ...] = (256, 128), lr: float = 3e-3, weight_decay: float = 0.1,
                 epochs: int = 400, patience: int = 100, val_fraction: float = 0.15, seed: int = 0,
                 dropout: float = 0.1):
        self.hidden, self.lr, self.weight_decay, self.epochs = hidden, lr, weight_decay, epochs
        self.patience, self.val_fraction, self.seed, self.dropout = patience, val_fraction, seed, dropout

    def _net(self, n_in: int) -> nn.Module:
        layers, width = [], n_in
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(self.dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "MLPSurrogate":
        """Fit on ``X [n, N]`` (1 = active) and ``y [n]``."""
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        # The network sees which heads are *pruned* (1 - bits): sparse inputs with the unrepaired
        # model at the origin. With the active bits as inputs (mostly ones) the same MLP reached
        # a held-out Spearman of 0.22 on SmolLM2 log-perplexity; with pruned bits, 0.78.
        X = 1.0 - torch.as_tensor(np.asarray(X, dtype=np.float32))
        y = np.asarray(y, dtype=np.float64)
        self.y_mean_, self.y_std_ = float(y.mean()), float(y.std() or 1.0)
        yt = torch.as_tensor((y - self.y_mean_) / self.y_std_, dtype=torch.float32)
        n = len(X)
        perm = torch.randperm(n, generator=gen)
        n_val = max(1, int(round(self.val_fraction * n))) if n >= 10 else 0
        val, tr = perm[:n_val], perm[n_val:]
        net = self._net(X.shape[1])
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_loss, since = copy.deepcopy(net.state_dict()), float("inf"), 0
        batch = min(64, len(tr))
        for epoch in range(self.epochs):
            net.train()
            order = tr[torch.randperm(len(tr), generator=gen)]
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                opt.zero_grad()
                loss = ((net(X[idx]).squeeze(-1) - yt[idx]) ** 2).mean()
                loss.backward()
                opt.step()
            if n_val:
                net.eval()
                with torch.no_grad():
                    vl = ((net(X[val]).squeeze(-1) - yt[val]) ** 2).mean().item()
                if vl < best_loss - 1e-6:
                    best, best_loss, since = copy.deepcopy(net.state_dict()), vl, 0
                else:
                    since += 1
                    if since >= self.patience:
                        break
        if n_val:
            net.load_state_dict(best)
        self.model_ = net.eval()
        self.epochs_run_ = epoch + 1
        return self

    def predict_torch(self, X: torch.Tensor) -> torch.Tensor:
        """Predictions for a float tensor ``[n, N]`` (used by the vectorised annealer)."""
        with torch.no_grad():
            return self.model_(1.0 - X).squeeze(-1) * self.y_std_ + self.y_mean_

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions for ``X [n, N]``."""
        return self.predict_torch(torch.as_tensor(np.asarray(X, dtype=np.float32))).numpy().astype(np.float64)


class RidgeSurrogate:
    """Linear ridge regression on mask bits (scikit-learn's :class:`~sklearn.linear_model.Ridge`), the reference."""

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def fit(self, X: np.ndarray, y: np.ndarray) -> "RidgeSurrogate":
        """Fit on ``X [n, N]`` and ``y [n]``."""
        from sklearn.linear_model import Ridge

        self.model_ = Ridge(alpha=self.alpha).fit(np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64))
        self.w_ = torch.as_tensor(self.model_.coef_, dtype=torch.float32)
        self.b_ = float(self.model_.intercept_)
        return self

    def predict_torch(self, X: torch.Tensor) -> torch.Tensor:
        """Predictions for a float tensor ``[n, N]``."""
        return X @ self.w_ + self.b_

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions for ``X [n, N]``."""
        return self.model_.predict(np.asarray(X, dtype=np.float64))


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """MSE, R^2 and Spearman rank correlation."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    mse = float(np.mean((y_true - y_pred) ** 2))
    var = float(np.var(y_true))
    rho = spearmanr(y_true, y_pred).statistic if len(y_true) > 2 else float("nan")
    return {"mse": mse, "r2": 1 - mse / var if var > 0 else float("nan"), "spearman": float(rho), "n": len(y_true)}


def holdout_metrics(make, X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> dict:
    """K-fold cross-validated metrics of surrogate factory ``make()`` (every mask held out once)."""
    from sklearn.model_selection import KFold

    folds = max(2, min(folds, len(y)))
    pred = np.empty(len(y))
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(X):
        pred[test] = make().fit(X[train], y[train]).predict(X[test])
    out = regression_metrics(y, pred)
    out["folds"] = folds
    return out


class TargetwiseSurrogate:
    """One regressor per target (bias, log-perplexity) on the mask bits: the paper's ``mlp``, or ``ridge``.

    ``metrics`` is K-fold CV of the regressor and of the ridge reference on every target.
    """

    regressor: str = ""
    needs_summaries = False

    def __init__(self, seed: int = 0, folds: int = 5):
        self.seed, self.folds = seed, folds

    @classmethod
    def from_options(cls, shrink: bool = True, seed: int = 0):
        return cls(seed=seed)

    def _make(self, kind: str):
        return MLPSurrogate(seed=self.seed) if kind == "mlp" else RidgeSurrogate()

    def fit(self, data: TrainingSet) -> "TargetwiseSurrogate":
        self.bias_ = self._make(self.regressor).fit(data.bits, data.bias)
        self.log_ppl_ = self._make(self.regressor).fit(data.bits, data.log_ppl)
        return self

    def predict_torch(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted bias, predicted log-perplexity) for ``X [n, N]``."""
        return self.bias_.predict_torch(X), self.log_ppl_.predict_torch(X)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.bias_.predict(X), self.log_ppl_.predict(X)

    def metrics(self, data: TrainingSet) -> dict:
        cv = {target: {k: holdout_metrics(lambda k=k: self._make(k), data.bits, y, self.folds, self.seed)
                       for k in dict.fromkeys([self.regressor, "ridge"])}
              for target, y in (("bias", data.bias), ("log_perplexity", data.log_ppl))}
        return {"kind": self.regressor, "samples": len(data.bias), "folds": cv["bias"][self.regressor]["folds"],
                "cv": cv}


@register_surrogate("additive")
class AdditiveSurrogate:
    """Head effects that add up: in the bias measure's summary (bucket means) and in log-perplexity.

    The bias of a HolisticBias axis is a fixed function of the bucket means (the spread
    around their weighted mean), and single-head knockouts measure each head's shift of
    every bucket mean directly. The model:

        means(m)  = means(0) + sum_{h pruned in m} D[h]            ([B] per mask)
        bias(m)   = statistic(means(m))
        S(m)      = sum_{h pruned in m} E[h];  log_ppl(m) = log_ppl(0) + S(m) + c * S(m)^2

    ``fit`` takes the evaluated masks (pruned indicators), their summaries and
    log-perplexities; rows that prune one head (knockouts) give ``D``/``E`` directly (a
    knockout with NaN log-perplexity, measured for the bias only, gives ``D`` alone: its ``E``
    is the prior's value on the line the other knockouts fit), and
    multi-head rows refine them by ridge regression toward the knockout values (``ridge``
    is the penalty in units of one mask's squared error). ``c >= 0`` lets removals compound
    in perplexity. With ``shrink``, each knockout effect is shrunk by its own noise toward
    ``prior`` (empirical Bayes, from ``summary_var``, the sampling variance of each
    knockout's summary shift; ``prior`` defaults to zero, first-order estimates are better):
    the search then cannot chase effects that are mostly prompt noise.
    """

    needs_summaries = True

    def __init__(self, ridge: float = 10.0, shrink: bool = True, seed: int = 0):
        self.ridge, self.shrink, self.seed = ridge, shrink, seed

    @classmethod
    def from_options(cls, shrink: bool = True, seed: int = 0):
        return cls(shrink=shrink, seed=seed)

    def fit(self, data: TrainingSet) -> "AdditiveSurrogate":
        """Fit on a :class:`TrainingSet` with summaries (see :meth:`fit_arrays`)."""
        return self.fit_arrays(data.pruned, data.summaries, data.log_ppl, data.statistic, data.summary_var, data.prior,
                               data.log_ppl_var, data.log_ppl_prior)

    def metrics(self, data: TrainingSet) -> dict:
        """Held-out accuracy on the multi-head masks (:func:`additive_metrics`), and the compounding term."""
        inside = np.ones(len(data.bias), dtype=bool) if data.inside is None else data.inside
        m = additive_metrics(lambda: type(self)(ridge=self.ridge, shrink=self.shrink), data.pruned, data.summaries,
                             data.log_ppl, data.statistic, data.summary_var, data.bias, inside=inside,
                             seed=data.seed, prior=data.prior, log_ppl_var=data.log_ppl_var,
                             log_ppl_prior=data.log_ppl_prior)
        out = {"kind": "additive", "samples": len(data.bias), **m}
        if hasattr(self, "c_"):
            out["compounding"] = self.c_
        return out

    def fit_arrays(self, pruned: np.ndarray, summaries: np.ndarray, log_ppl: np.ndarray, statistic,
                   summary_var: np.ndarray | None = None, prior: np.ndarray | None = None,
                   log_ppl_var: np.ndarray | None = None, log_ppl_prior: np.ndarray | None = None
                   ) -> "AdditiveSurrogate":
        """Fit on ``pruned [M, N]`` (1 = pruned), ``summaries [M, B]``, ``log_ppl [M]``; row 0..M-1 any order.

        ``statistic(means [..., B] tensor) -> bias [...]`` maps summaries to the bias; the
        unrepaired model (a row with nothing pruned) must be among the rows.
        ``summary_var [M, B]`` (optional) is each row's sampling variance of its summary
        shift from the unrepaired model (used by ``shrink``); ``prior [N, B]`` (optional) an
        independent estimate of every head's summary shift, the target of the shrinkage and
        the effect of heads without a knockout. ``log_ppl_var [M]`` and ``log_ppl_prior [N]``
        (optional, both needed) do the same for log-perplexity, the prior first put on the
        knockouts' scale by a least-squares line (a first-order estimate is a linearisation:
        its scale is not the knockout's).
        """
        P = np.asarray(pruned, dtype=np.float64)
        Y = np.asarray(summaries, dtype=np.float64).reshape(len(P), -1)
        lp = np.asarray(log_ppl, dtype=np.float64)
        counts = P.sum(1)
        base = np.nonzero(counts == 0)[0]
        if not len(base):
            raise ValueError("the unrepaired model (nothing pruned) must be among the fitted masks")
        self.base_summary_, self.base_log_ppl_ = Y[base[0]], lp[base[0]]
        N = P.shape[1]
        D0 = np.zeros((N, Y.shape[1])) if prior is None else np.asarray(prior, dtype=np.float64).reshape(N, -1).copy()
        target = D0.copy()
        E0 = np.zeros(N)
        self.knocked_ = np.zeros(N, dtype=bool)
        singles = np.nonzero(counts == 1)[0]
        heads = np.array([int(np.argmax(P[i])) for i in singles], dtype=int)  # the head each knockout prunes
        with_ppl = np.isfinite(lp[singles])  # knockouts measured for the bias alone read NaN perplexity
        D0[heads] = Y[singles] - self.base_summary_
        E0[heads[with_ppl]] = lp[singles[with_ppl]] - self.base_log_ppl_
        self.knocked_[heads] = True
        k = self.knocked_
        kp = np.zeros(N, dtype=bool)  # heads whose knockout measured perplexity
        kp[heads[with_ppl]] = True
        if self.shrink and summary_var is not None and len(singles) > 2:
            V = np.zeros_like(D0)
            V[heads] = np.asarray(summary_var)[singles]
            D0[k] = _shrunk(D0[k], target[k], V[k], 1e-12)
        if self.shrink and log_ppl_var is not None and log_ppl_prior is not None and kp.sum() > 2:
            # the first-order prior on the knockouts' scale (a linearisation's scale is not a knockout's)
            line = on_line(np.asarray(log_ppl_prior, dtype=np.float64).reshape(-1), E0, kp)
            V = np.zeros(N)
            V[heads[with_ppl]] = np.asarray(log_ppl_var)[singles[with_ppl]]
            measured, E0 = E0, line.copy()  # heads without a perplexity measurement take the line
            E0[kp] = _shrunk(measured[kp], line[kp], V[kp], 1e-18)
        elif not with_ppl.all():
            raise ValueError("knockouts without perplexity need log_ppl_var and log_ppl_prior (and shrink) to take "
                             "their perplexity effects from the prior's line, and at least 3 knockouts with it")
        multi = counts > 1
        self.D_, self.E_ = D0.copy(), E0.copy()
        if multi.any():
            Pm = P[multi]
            A = Pm.T @ Pm + self.ridge * np.eye(N)
            self.D_ += np.linalg.solve(A, Pm.T @ (Y[multi] - self.base_summary_ - Pm @ D0))
            self.E_ += np.linalg.solve(A, Pm.T @ (lp[multi] - self.base_log_ppl_ - Pm @ E0))
            S = Pm @ self.E_
            resid = lp[multi] - self.base_log_ppl_ - S
            self.c_ = float(max(0.0, (S * S) @ resid / max((S ** 2) @ (S ** 2), 1e-12)))
        else:
            self.c_ = 0.0
        self.statistic_ = statistic
        self.Dt_ = torch.as_tensor(self.D_, dtype=torch.float32)
        self.Et_ = torch.as_tensor(self.E_, dtype=torch.float32)
        self.y0t_ = torch.as_tensor(self.base_summary_, dtype=torch.float32)
        return self

    def predict_torch(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bias, log-perplexity) for mask bits ``X [n, N]`` (1 = active)."""
        pruned = 1.0 - X
        S = pruned @ self.Et_
        return self.statistic_(self.y0t_ + pruned @ self.Dt_), self.base_log_ppl_ + S + self.c_ * S * S

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bias, log-perplexity) for ``X [n, N]``."""
        b, lp = self.predict_torch(torch.as_tensor(np.asarray(X, dtype=np.float32)))
        return b.numpy().astype(np.float64), lp.numpy().astype(np.float64)


def on_line(estimate: np.ndarray, measured: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``estimate`` put on the scale of ``measured`` by the least-squares line fitted ``where`` both are known.

    A first-order estimate is a linearisation: it ranks the heads' perplexity effects, but its
    scale is not a knockout's.
    """
    slope, intercept = np.polyfit(estimate[where], measured[where], 1)
    return intercept + slope * estimate


def _shrunk(effects: np.ndarray, target: np.ndarray, variance: np.ndarray, eps: float) -> np.ndarray:
    """Empirical Bayes: each effect (rows) moved toward ``target`` by signal / (signal + its own noise ``variance``).

    The signal is the spread of the effects about the target less their mean noise (per column).
    """
    resid = effects - target
    signal = np.maximum(resid.var(axis=0) - variance.mean(axis=0), 0.0)  # spread of the true deviations
    return target + resid * signal / (signal + variance + eps)


def additive_metrics(make, pruned: np.ndarray, summaries: np.ndarray, log_ppl: np.ndarray, statistic,
                     summary_var: np.ndarray | None, bias: np.ndarray, inside: np.ndarray, folds: int = 5,
                     seed: int = 0, prior: np.ndarray | None = None, log_ppl_var: np.ndarray | None = None,
                     log_ppl_prior: np.ndarray | None = None) -> dict:
    """Held-out accuracy of an additive surrogate on the masks that prune several heads.

    K-fold over the multi-head masks; the unrepaired model and the knockouts always stay in
    the training part (they are the model's main effects). ``cv`` scores every multi-head
    mask, ``cv_inside_budget`` only those whose measured perplexity met the budget (where
    the choice is made), and ``knockouts_only`` the prediction from the knockouts alone.
    """
    from sklearn.model_selection import KFold

    multi = np.nonzero(pruned.sum(1) > 1)[0]
    if len(multi) < max(folds, 3):
        return {"folds": 0, "cv": {}, "multi_head_masks": int(len(multi))}
    pred_b, pred_lp = np.empty(len(multi)), np.empty(len(multi))
    for _, test in KFold(folds, shuffle=True, random_state=seed).split(multi):
        keep = np.ones(len(pruned), dtype=bool)
        keep[multi[test]] = False
        m = make().fit_arrays(pruned[keep], summaries[keep], log_ppl[keep], statistic,
                              None if summary_var is None else summary_var[keep], prior,
                              None if log_ppl_var is None else log_ppl_var[keep], log_ppl_prior)
        pred_b[test], pred_lp[test] = m.predict(1 - pruned[multi[test]])
    single = pruned.sum(1) <= 1
    first = make().fit_arrays(pruned[single], summaries[single], log_ppl[single], statistic,
                              None if summary_var is None else summary_var[single], prior,
                              None if log_ppl_var is None else log_ppl_var[single], log_ppl_prior)
    fb, flp = first.predict(1 - pruned[multi])
    ins = inside[multi]
    out = {"folds": folds, "multi_head_masks": int(len(multi)),
           "cv": {"bias": {"additive": regression_metrics(bias[multi], pred_b)},
                  "log_perplexity": {"additive": regression_metrics(log_ppl[multi], pred_lp)}},
           "knockouts_only": {"bias": regression_metrics(bias[multi], fb),
                              "log_perplexity": regression_metrics(log_ppl[multi], flp)}}
    if ins.sum() > 2:
        out["cv_inside_budget"] = {"bias": regression_metrics(bias[multi][ins], pred_b[ins]),
                                   "log_perplexity": regression_metrics(log_ppl[multi][ins], pred_lp[ins])}
    return out


@register_surrogate("mlp")
class MLPPair(TargetwiseSurrogate):
    """The paper's surrogates: an :class:`MLPSurrogate` per target."""

    regressor = "mlp"


@register_surrogate("ridge")
class RidgePair(TargetwiseSurrogate):
    """The linear reference: a :class:`RidgeSurrogate` per target."""

    regressor = "ridge"
