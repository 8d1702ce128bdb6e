"""The parametric bootstrap: refit the model to responses simulated from the fit.

Each replicate draws a response from the fitted model (:mod:`.simulate`: new random
effects, then the response) and refits the same model to it, recording the objective,
β, θ, σ and the standard deviations and correlations of the random effects. Quantiles
of the replicates give confidence intervals (lme4's ``bootMer`` with ``confint(...,
method = "boot")``; MixedModels.jl's ``parametricbootstrap``).

Notes
-----
Speed comes from not rebuilding anything that does not depend on y: each worker copies
the specification once (``copy.copy(fit.model)``, which drops the compiled workspace, so
the copy builds a private one) and for every replicate replaces its response in place
(``replace_response``), which recomputes only the response's cross-products, then
refits without the finite-difference convergence check. The standard deviations and
correlations are computed afterwards for all replicates at once from θ and σ.

Where a refit starts: an LMM refit starts where a fit of that response would, from the
moment estimate of ``starting_theta`` with steps of a quarter of θ, not from the fit's
θ. ``fit(initial=θ̂)`` pairs θ̂ with lme4's first step for a start at the identity
(0.75), and on 1,000 sleepstudy replicates that large first step sent 21 refits to a
boundary optimum (the intercept's variance at zero) with an objective up to 7.7 above
the one the default start reached, and took 71 evaluations a refit against 39.

Reproducibility: replicate i draws from the i-th child of one SeedSequence, whichever
process refits it, so a seed gives the same table for any ``n_jobs``, and replicate i's
response is ``simulate(fit, n, seed)[i]``.
"""
import contextlib
import copy
import math
import os
import threading
import uuid
import warnings
from collections import Counter

import numpy as np
import pandas as pd

from .simulate import Simulator, _check_count, replicate_streams


class BootstrapWarning(UserWarning):
    """Some bootstrap refits failed, or warned (the warnings are counted, not shown)."""


def bootstrap(fit, n, seed=None, n_jobs=1, progress=False, client=None):
    """The parametric bootstrap of a fitted mixed model.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
        The fit to resample from (also one loaded from a pickle). Only the fit travels
        to worker processes; it carries its specification, not the data frame.
    n : int
        Number of replicates.
    seed : None, int, numpy.random.SeedSequence or numpy.random.Generator
        Seeds one stream per replicate (see :func:`.simulate.replicate_streams`); the
        table is the same for a seed whatever ``n_jobs``. With None the entropy used is
        kept on the result (``result.seed``), so the run can be repeated.
    n_jobs : int, default 1
        Worker processes (joblib's convention: -1 for every CPU, -2 for all but one).
        1 refits in this process.
    progress : bool, default False
        Show a tqdm progress bar.
    client : dask.distributed.Client, optional
        Refit on the client's workers instead: the fit is sent to every worker once
        (``client.scatter(..., broadcast=True)``) and each task refits a batch of
        replicates on a private copy of the model kept per worker thread. The table is
        the one a local run gives for the same seed. Leave ``n_jobs`` at 1.

    Returns
    -------
    BootstrapResult

    Warns
    -----
    BootstrapWarning
        When some refits failed (their rows are NaN) or raised warnings (convergence
        warnings are suppressed per replicate and counted here).

    Raises
    ------
    RuntimeError
        When every refit failed (the first error is quoted).

    Notes
    -----
    Each refit starts as a fit of that response would (see the module's notes on why
    not from the fit's θ); a GLMM refit runs the fit's own strategy (``fast`` or the
    joint optimization). Refits are done with ``check_convergence=False``: the
    finite-difference gradient and Hessian would cost more than the refit itself.

    Examples
    --------
    >>> import mixedmodels as mm
    >>> m = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
    >>> boot = bootstrap(m, 200, seed=42)
    >>> boot.confint().loc["sigma"]                                 # doctest: +SKIP
    """
    n = _check_count(n)
    if n == 0:
        raise ValueError("n must be at least 1")
    streams, entropy = replicate_streams(seed, n)
    jobs = _effective_jobs(n_jobs, n)
    if client is not None and jobs != 1:
        raise ValueError("give n_jobs (local worker processes) or client (Dask workers), "
                         "not both")
    names = _Names(fit)
    bar = _progress_bar(n, progress)
    try:
        if client is not None:
            chunks = _run_dask(fit, streams, client, bar)
        elif jobs == 1:
            worker = _Worker(fit)
            tick = bar.update if bar is not None else None
            with worker.blas_limit():
                chunks = [worker.run(idx, [streams[i] for i in idx], tick)
                          for idx in _chunks(n, 64)]
        else:
            chunks = _run_parallel(fit, streams, jobs, bar)
    finally:
        if bar is not None:
            bar.close()
    core = np.vstack([c[0] for c in chunks])
    failures = {i: msg for c in chunks for i, msg in c[1]}
    warned = {i: msgs for c in chunks for i, msgs in c[2]}
    if len(failures) == n:
        first = failures[min(failures)]
        raise RuntimeError(f"every one of the {n} bootstrap refits failed; the first: {first}")
    _report(n, failures, warned)
    values = names.table(core)
    estimate = names.table(names.core_row(fit)[None, :])[0]
    return BootstrapResult(values=values, columns=names.columns, estimate=estimate,
                           variance_names=names.variance_names, coef_names=names.coef_names,
                           failures=failures, warned=warned, seed=entropy)


class BootstrapResult:
    """The replicates of a parametric bootstrap.

    Attributes
    ----------
    values : numpy.ndarray, shape (n, ncolumns)
        One row per replicate, columns as ``columns``; NaN in the rows of failed refits.
    columns : list of str
        ``objective``, the coefficients by name, ``theta1``... , then the variance
        parameters with lme4's names: ``sd_<column>|<group>``,
        ``cor_<column>.<column>|<group>``, and ``sigma`` when the model has one.
    estimate : pandas.Series
        The same quantities at the original fit.
    variance_names, coef_names : list of str
        The parameters that :meth:`confint` reports, in its order.
    failures : dict of int -> str
        Replicate index -> the error of its failed refit.
    warned : dict of int -> list of str
        Replicate index -> the warnings its refit raised (suppressed while refitting).
    seed : int
        Entropy of the root SeedSequence: ``bootstrap(fit, n, seed=result.seed)``
        repeats a run made with ``seed=None``.
    """

    def __init__(self, values, columns, estimate, variance_names, coef_names,
                 failures, warned, seed):
        self.values = values
        self.columns = list(columns)
        self.estimate = pd.Series(estimate, index=self.columns, name="estimate")
        self.variance_names = list(variance_names)
        self.coef_names = list(coef_names)
        self.failures = dict(failures)
        self.warned = dict(warned)
        self.seed = seed

    @property
    def n(self):
        """Number of replicates (failed ones included)."""
        return self.values.shape[0]

    @property
    def n_failed(self):
        return len(self.failures)

    @property
    def n_warned(self):
        return len(self.warned)

    def __len__(self):
        return self.n

    def __repr__(self):
        extra = ""
        if self.failures:
            extra += f", {self.n_failed} failed"
        if self.warned:
            extra += f", {self.n_warned} with warnings"
        return f"<BootstrapResult: {self.n} replicates{extra}; parameters {self.parameters}>"

    @property
    def parameters(self):
        """What :meth:`confint` reports: the variance parameters, then β."""
        return self.variance_names + self.coef_names

    def to_frame(self):
        """The replicates as a DataFrame, one row per replicate (index ``replicate``).

        Returns
        -------
        pandas.DataFrame
            Columns ``objective``, each coefficient by name, ``theta1``..., then
            ``sd_...``, ``cor_...`` and ``sigma`` as in :attr:`columns`.
        """
        return pd.DataFrame(self.values, columns=self.columns,
                            index=pd.RangeIndex(self.n, name="replicate"))

    def confint(self, level=0.95, method="percentile"):
        """Bootstrap confidence intervals of the variance parameters and β.

        Parameters
        ----------
        level : float, default 0.95
        method : {"percentile", "shortest"}
            "percentile": the (1 - level)/2 and (1 + level)/2 quantiles of the
            replicates (numpy's default, linear interpolation between order
            statistics), as lme4's ``confint(..., method = "boot")``. "shortest": the
            shortest interval holding ⌈level·m⌉ of the m replicates, MixedModels.jl's
            default.

        Returns
        -------
        pandas.DataFrame
            Indexed by parameter (``sd_(Intercept)|subj``, ``cor_days.(Intercept)|subj``,
            ..., ``sigma``, then the coefficients by name), columns ``lower`` and
            ``upper``.

        Notes
        -----
        Replicates with NaN in a parameter (failed refits; a correlation whose standard
        deviation is zero) are left out of that parameter's interval.
        """
        level = float(level)
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be between 0 and 1, not {level}")
        if method not in ("percentile", "shortest"):
            raise ValueError(f'method must be "percentile" or "shortest", not {method!r}')
        where = {name: j for j, name in enumerate(self.columns)}
        rows = []
        for name in self.parameters:
            v = self.values[:, where[name]]
            v = v[~np.isnan(v)]
            if v.size == 0:
                rows.append((np.nan, np.nan))
            elif method == "percentile":
                alpha = (1.0 - level) / 2.0
                lo, hi = np.quantile(v, [alpha, 1.0 - alpha])
                rows.append((lo, hi))
            else:
                rows.append(_shortest(np.sort(v), level))
        return pd.DataFrame(rows, columns=["lower", "upper"],
                            index=pd.Index(self.parameters, name="parameter"))


def _shortest(v, level):
    """The shortest [v[i], v[i + k - 1]] holding k = ⌈level·m⌉ of the sorted values."""
    m = v.size
    k = max(1, min(m, math.ceil(level * m - 1e-9)))
    widths = v[k - 1:] - v[:m - k + 1]
    i = int(np.argmin(widths))
    return v[i], v[i + k - 1]


class _Names:
    """The columns of the table and how the variance parameters follow from θ and σ."""

    def __init__(self, fit):
        model = fit.model
        self.layout = model.layout
        self.coef_names = list(fit.coef_names)
        self.p = len(fit.coef)
        if len(self.coef_names) != self.p:
            raise ValueError("the fit has a different number of coefficients and names")
        self.ntheta = self.layout.ntheta
        self.has_sigma = fit.sigma is not None
        # an LMM's Λ is relative to σ; a GLMM's is on the scale of b itself
        self.relative = not fit.is_glmm
        self.terms = []
        variance = []
        for t, term in enumerate(model.reterms):
            k, cn, g = term.ncols, list(term.cnames), term.group_name
            pairs = []
            # lme4's order: the lower triangle by columns, a standard deviation on the
            # diagonal and a correlation (row.column) below it
            for a in range(k):
                variance.append(f"sd_{cn[a]}|{g}")
                pairs.append((a, a))
                if term.zerocorr:
                    continue
                for e in range(a + 1, k):
                    variance.append(f"cor_{cn[e]}.{cn[a]}|{g}")
                    pairs.append((e, a))
            self.terms.append((int(self.layout.lam_off[t]), k, pairs))
        if self.has_sigma:
            variance.append("sigma")
        self.variance_names = variance
        self.core = (["objective"] + self.coef_names
                     + [f"theta{j + 1}" for j in range(self.ntheta)]
                     + (["sigma"] if self.has_sigma else []))
        self.columns = self.core[:-1] + variance if self.has_sigma else self.core + variance

    @property
    def ncore(self):
        return len(self.core)

    def core_row(self, fit):
        """objective, β, θ[, σ] of one fit, as the workers record them."""
        extra = [fit.sigma] if self.has_sigma else []
        return np.concatenate([[fit.objective], np.asarray(fit.coef, dtype=float),
                               np.asarray(fit.theta, dtype=float), extra])

    def table(self, core):
        """Full rows of the table (``columns``) from rows of core values."""
        # σ is the last core value and the last variance parameter: keep it once
        kept = core[:, :-1] if self.has_sigma else core
        return np.column_stack([kept, self.variance_values(core)])

    def variance_values(self, core):
        """The sd/cor (and σ) columns for rows of core values, all rows at once."""
        m = core.shape[0]
        o = 1 + self.p
        theta = core[:, o:o + self.ntheta]
        sigma = core[:, o + self.ntheta] if self.has_sigma else np.ones(m)
        scale = sigma if self.relative else np.ones(m)
        lam = np.zeros((m, self.layout.nlam))
        lam[:, self.layout.index] = theta
        cols = []
        with np.errstate(invalid="ignore", divide="ignore"):
            for off, k, pairs in self.terms:
                # T[r, i, j] = lam[r, off + i + j k] (column-major templates)
                tmpl = lam[:, off:off + k * k].reshape(m, k, k).transpose(0, 2, 1)
                norms = np.sqrt(np.einsum("rij,rij->ri", tmpl, tmpl))
                for i, j in pairs:
                    if i == j:
                        cols.append(scale * norms[:, i])
                    else:
                        dot = np.einsum("rk,rk->r", tmpl[:, i, :], tmpl[:, j, :])
                        cols.append(dot / (norms[:, i] * norms[:, j]))
        if self.has_sigma:
            cols.append(sigma)
        return np.column_stack(cols) if cols else np.empty((m, 0))


class _Worker:
    """A private copy of the specification, refitted to one simulated response after
    another (``replace_response`` keeps its workspace)."""

    def __init__(self, fit):
        self.spec = copy.copy(fit.model)
        self.simulator = Simulator(fit)
        self.names = _Names(fit)
        self.is_glmm = bool(fit.is_glmm)
        self.fast = bool(getattr(fit, "fast", False))

    def blas_limit(self):
        """One BLAS thread while refitting, unless CHOLMOD factors with dense supernodes.

        Each refit makes a few tiny dense calls (triangular solves of the p-square
        factor of the fixed effects): BLAS threads cannot speed them up, and on a busy
        machine waking them costs milliseconds a call, which measured 20-40 times the
        whole refit of sleepstudy. Only a supernodal CHOLMOD factorization has dense
        blocks worth the threads. The limit needs threadpoolctl; without it the BLAS
        threads are left as they are.
        """
        factor = getattr(self.spec.workspace, "factor", None)
        if factor is not None and getattr(factor, "is_supernodal", False):
            return contextlib.nullcontext()
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return contextlib.nullcontext()
        return threadpool_limits(limits=1, user_api="blas")

    def refit(self):
        if self.is_glmm:
            return self.spec.fit(fast=self.fast, check_convergence=False)
        return self.spec.fit(check_convergence=False)

    def run(self, indices, streams, tick=None):
        """Refit the replicates ``indices`` (their streams given): returns the core
        values (NaN rows for failures), [(index, error)], [(index, [warnings])]."""
        with warnings.catch_warnings():
            # the Simulator's own warnings were given when the bootstrap started
            warnings.simplefilter("ignore")
            responses = self.simulator.draw(streams)
        core = np.full((len(indices), self.names.ncore), np.nan)
        failures, warned = [], []
        for j, i in enumerate(indices):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    self.spec.replace_response(responses[j])
                    core[j] = self.names.core_row(self.refit())
                except Exception as exc:   # noqa: BLE001 — a failed replicate is data
                    failures.append((int(i), f"{type(exc).__name__}: {exc}"))
            if caught:
                warned.append((int(i), [f"{w.category.__name__}: {w.message}" for w in caught]))
            if tick is not None:
                tick(1)
        return core, failures, warned


# -- running in worker processes --------------------------------------------------------

_WORKER_CACHE = {}


def _worker_chunk(fit, key, indices, streams):
    """A joblib task: refit a chunk in a worker process, whose private copy of the model
    is built for the first chunk of a run (``key``) and reused by the next ones."""
    worker = _WORKER_CACHE.get(key)
    if worker is None:
        # one run at a time per process: drop the copies of earlier runs
        _WORKER_CACHE.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            worker = _WORKER_CACHE[key] = _Worker(fit)
    with worker.blas_limit():
        return worker.run(indices, streams)


def _run_parallel(fit, streams, jobs, bar):
    try:
        from joblib import Parallel, delayed
    except ImportError as exc:   # pragma: no cover - joblib is a dependency
        raise ImportError("n_jobs > 1 needs joblib (pip install joblib)") from exc
    # the Simulator's warnings (e.g. ignored prior weights) once, here, not per worker
    Simulator(fit)
    n = len(streams)
    # a few chunks per worker: balances the load and updates the progress bar, while
    # each chunk's overhead (sending the fit, one vectorized simulation) stays small
    size = max(1, min(250, math.ceil(n / (8 * jobs))))
    key = uuid.uuid4().hex
    tasks = (delayed(_worker_chunk)(fit, key, idx, [streams[i] for i in idx])
             for idx in _chunks(n, size))
    out = []
    for res in Parallel(n_jobs=jobs, return_as="generator")(tasks):
        out.append(res)
        if bar is not None:
            bar.update(res[0].shape[0])
    return out


# -- running on Dask workers ----------------------------------------------------------------

# (run key, thread) -> _Worker: a Dask worker runs tasks in several threads of one process
# (and a LocalCluster with processes=False runs them in the client's), so each thread
# refits on its own copy of the model
_DASK_WORKERS = {}
_DASK_LOCK = threading.Lock()


def _dask_chunk(fit, key, indices, streams):
    """A Dask task: refit a batch of replicates on this thread's copy of the model."""
    ident = (key, threading.get_ident())
    with _DASK_LOCK:
        for other in [k for k in _DASK_WORKERS if k[0] != key]:
            del _DASK_WORKERS[other]        # copies left by earlier runs
        worker = _DASK_WORKERS.get(ident)
    if worker is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            worker = _Worker(fit)
        with _DASK_LOCK:
            _DASK_WORKERS[ident] = worker
    with worker.blas_limit():
        return worker.run(indices, streams)


def _run_dask(fit, streams, client, bar):
    try:
        from distributed import as_completed
    except ImportError as exc:   # pragma: no cover - a client implies distributed
        raise ImportError('client= needs the dask extra: pip install "mixedmodels[dask]"') from exc
    Simulator(fit)            # its warnings once, here, and its errors before any task
    n = len(streams)
    threads = max(1, sum(client.nthreads().values()))
    size = max(1, min(250, math.ceil(n / (4 * threads))))
    key = uuid.uuid4().hex
    [shipped] = client.scatter([fit], broadcast=True, hash=False)
    batches = _chunks(n, size)
    futures = [client.submit(_dask_chunk, shipped, key, idx, [streams[i] for i in idx],
                             pure=False) for idx in batches]
    where = {f.key: j for j, f in enumerate(futures)}
    out = [None] * len(futures)
    try:
        for future in as_completed(futures):
            res = future.result()
            out[where[future.key]] = res
            if bar is not None:
                bar.update(res[0].shape[0])
    finally:
        client.cancel(futures + [shipped])
    return out


def _chunks(n, size):
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def _effective_jobs(n_jobs, n):
    if n_jobs is None:
        return 1
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise ValueError(f"n_jobs must be a non-zero integer, not {n_jobs!r}")
    cpus = os.cpu_count() or 1
    jobs = int(n_jobs) if n_jobs > 0 else max(1, cpus + 1 + int(n_jobs))
    return max(1, min(jobs, n))


def _progress_bar(n, progress):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:   # pragma: no cover - tqdm is a dependency
        raise ImportError("progress=True needs tqdm (pip install tqdm)") from exc
    return tqdm(total=n, desc="bootstrap", unit="fit")


def _report(n, failures, warned):
    """One warning for the failed refits and one for those that warned."""
    if failures:
        first = failures[min(failures)]
        warnings.warn(f"{len(failures)} of {n} bootstrap refits failed; their rows are NaN "
                      f"(first, replicate {min(failures)}: {first})", BootstrapWarning,
                      stacklevel=3)
    if warned:
        counts = Counter(m for msgs in warned.values() for m in set(msgs))
        common, times = counts.most_common(1)[0]
        warnings.warn(f"{len(warned)} of {n} bootstrap refits raised warnings, suppressed "
                      f"(most often, {times} times: {common}); see result.warned",
                      BootstrapWarning, stacklevel=3)
