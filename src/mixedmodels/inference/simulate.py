"""Responses drawn from a fitted mixed model: new random effects, then the response.

The draws are unconditional on the fitted modes (lme4's ``simulate`` with
``use.u = FALSE``; MixedModels.jl's ``simulate!``): each replicate has its own
spherical random effects u ~ N(0, I), so a replicate is a new data set from the
fitted model, which is what the parametric bootstrap refits.

Notes
-----
With Λ the relative covariance factor of the fit (θ's templates, one block per level):

- LMM: b = σΛu, η = Xβ + Zb + offset, and y = η + σε/√w with ε ~ N(0, I) and w the
  precision weights (1 without weights), so y ~ N(Xβ + offset, σ²(ZΛΛ'Z' + W⁻¹)).
- GLMM: b = Λu (Λ is on the scale of b itself), η = Xβ + Zb + offset, μ = g⁻¹(η), and
  y is drawn from the family given μ, with w the prior weights and φ the dispersion:
  Bernoulli 0/1 with P(1) = μ; Binomial successes ~ Bin(w, μ) returned as the
  proportion successes/w; Poisson with mean μ; negative binomial (NB2) with mean μ and
  the family's shape θ; Gamma with mean μ and shape w/φ;
  inverse Gaussian with mean μ and shape w/φ; Normal with mean μ and variance φ/w.
  Rows of prior weight zero carry no information; they keep their observed response
  (a zero-weight draw would be degenerate, e.g. a Gamma of shape zero).

Each replicate draws from its own random stream, the i-th child of one
:class:`numpy.random.SeedSequence`, and the arithmetic is elementwise within a
replicate, so replicate i is the same number for number whether it is drawn alone, with
others, or in another process: ``simulate(fit, n, seed)[i]`` is the response the
bootstrap with the same ``seed`` refits as replicate i.
"""
import warnings

import numpy as np


def simulate(fit, n=1, seed=None):
    """Draw responses from a fitted mixed model.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
        A fitted model (also one loaded from a pickle).
    n : int, default 1
        Number of replicates.
    seed : None, int, numpy.random.SeedSequence or numpy.random.Generator
        Where the random streams come from. An int (or a SeedSequence) makes the result
        reproducible; a Generator is advanced (128 bits are drawn from it to seed the
        replicates' streams), so repeated calls with one Generator give new draws.

    Returns
    -------
    numpy.ndarray, shape (n, nobs)
        One simulated response per row, on the scale the model is fitted to: for an
        LMM including any offset (the response of the formula), for Binomial the
        proportion of successes, with the prior weights as the numbers of trials.

    See Also
    --------
    mixedmodels.inference.bootstrap.bootstrap : refits the model to such responses.

    Examples
    --------
    >>> import mixedmodels as mm
    >>> m = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
    >>> simulate(m, n=3, seed=1).shape
    (3, 180)
    """
    n = _check_count(n)
    streams, _ = replicate_streams(seed, n)
    return Simulator(fit).draw(streams)


def replicate_streams(seed, n):
    """One child SeedSequence per replicate, and the entropy of their root.

    Parameters
    ----------
    seed : None, int, numpy.random.SeedSequence or numpy.random.Generator
    n : int

    Returns
    -------
    streams : list of numpy.random.SeedSequence
        ``streams[i]`` seeds replicate i.
    entropy : int
        The root's entropy: ``replicate_streams(entropy, n)`` gives the same streams
        (when the root was built here rather than passed in, partly spawned).
    """
    if isinstance(seed, np.random.SeedSequence):
        root = seed
    elif isinstance(seed, np.random.Generator):
        # drawing from the generator (rather than spawning from its seed sequence)
        # makes the result depend on its state: the same generator state, the same draws
        words = seed.integers(0, 2**32, size=4, dtype=np.uint64)
        root = np.random.SeedSequence([int(w) for w in words])
    elif seed is None or isinstance(seed, (int, np.integer)):
        root = np.random.SeedSequence(None if seed is None else int(seed))
    else:
        raise TypeError("seed must be None, an int, a numpy SeedSequence or a numpy "
                        f"Generator, not {type(seed).__name__}")
    return root.spawn(n), root.entropy


class Simulator:
    """What a fit needs to draw responses, gathered once (so a bootstrap worker pays
    for it once, not per replicate).

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit

    Notes
    -----
    Warnings about the model (prior weights a family cannot use) are given here, once.
    """

    def __init__(self, fit):
        model = fit.model
        self.is_glmm = bool(fit.is_glmm)
        self.nobs = int(fit.nobs)
        if self.is_glmm:
            self.family = fit.family
            scale = 1.0                    # Λ is on the scale of b for a GLMM
            offset = np.asarray(model.offset_or_zero, dtype=float)
            self.prior_w = np.asarray(model.prior_w, dtype=float)
            self.y_observed = np.asarray(fit.y, dtype=float)
            self.phi = 1.0 if fit.dispersion is None else float(fit.dispersion)
            self._check_weights()
        else:
            self.family = None
            scale = float(fit.sigma)       # Λ is relative to σ for an LMM
            offset = model.design.offset
            w = model.design.weights
            # σ/√w: the residual standard deviation of each row
            self.resid_sd = scale if w is None else scale / np.sqrt(np.asarray(w, dtype=float))
        # the fixed part of η as the fit computed it (X̃β̃: no cancellation from an
        # uncentred X), plus the offset
        base = np.array(fit.xbeta, dtype=float)
        if offset is not None:
            base = base + np.asarray(offset, dtype=float)
        self.base = base
        templates = model.layout.templates(np.asarray(fit.theta, dtype=float))
        self.terms = []
        uoff = 0
        for term, lam in zip(model.reterms, templates):
            k, nl = term.ncols, term.nlevels
            self.terms.append((np.asarray(term.codes, dtype=np.intp),
                               np.asarray(term.z, dtype=float), scale * lam, uoff, nl, k))
            uoff += k * nl
        self.q = uoff

    def _check_weights(self):
        name, w = self.family.name, self.prior_w
        if name == "Binomial":
            trials = np.round(w)
            if np.any(np.abs(w - trials) > 1e-8 * np.maximum(1.0, w)):
                raise ValueError("simulating a Binomial response needs whole numbers of "
                                 "trials as prior weights; these are not all whole numbers")
            self.trials = trials.astype(np.int64)
        elif name == "NegativeBinomial" and getattr(self.family, "theta", None) is None:
            raise ValueError("the negative binomial family of this fit has no value of its "
                             "shape θ to simulate with")
        if name in ("Bernoulli", "Poisson", "NegativeBinomial") and np.any((w != 0) & (w != 1)):
            # a weighted Bernoulli or Poisson likelihood is not the density of any one
            # draw; R's simulate ignores such weights too
            warnings.warn(f"prior weights other than 0 and 1 are ignored when simulating a "
                          f"{name} response", UserWarning, stacklevel=3)

    def linear_predictor(self, streams_u):
        """η for each replicate: the fixed part plus Z b from each stream's u."""
        m = len(streams_u)
        u = np.empty((m, self.q))
        for i, rng in enumerate(streams_u):
            u[i] = rng.standard_normal(self.q)
        eta = np.tile(self.base, (m, 1))
        for codes, z, lam, uoff, nl, k in self.terms:
            ut = u[:, uoff:uoff + k * nl].reshape(m, nl, k)
            for a in range(k):
                # b_a = Σ_e T[a, e] u_e, written out elementwise rather than as a matrix
                # product: a BLAS kernel may sum in an order that depends on how many
                # replicates are drawn together, and replicate i must not
                ba = lam[a, 0] * ut[:, :, 0]
                for e in range(1, a + 1):
                    ba = ba + lam[a, e] * ut[:, :, e]
                eta += z[:, a] * ba[:, codes]
        return eta

    def draw(self, streams):
        """Responses for the given streams: an array (len(streams), nobs).

        Parameters
        ----------
        streams : sequence of numpy.random.SeedSequence
            One per replicate (see :func:`replicate_streams`).
        """
        rngs = [np.random.Generator(np.random.PCG64(s)) for s in streams]
        eta = self.linear_predictor(rngs)
        if not self.is_glmm:
            for i, rng in enumerate(rngs):
                eta[i] += self.resid_sd * rng.standard_normal(self.nobs)
            return eta
        mu = self.family.link.inverse(eta)
        out = np.empty_like(mu)
        for i, rng in enumerate(rngs):
            out[i] = self._family_draw(rng, mu[i])
        return out

    def _family_draw(self, rng, mu):
        name, w, phi = self.family.name, self.prior_w, self.phi
        zero = w == 0
        if name == "Bernoulli":
            y = (rng.random(mu.size) < mu).astype(float)
        elif name == "Poisson":
            y = rng.poisson(mu).astype(float)
        elif name == "NegativeBinomial":
            # NB2 with shape θ: failures before the θ-th success, success probability θ/(θ+μ)
            theta = float(self.family.theta)
            y = rng.negative_binomial(theta, theta / (theta + mu)).astype(float)
        elif name == "Binomial":
            trials = self.trials
            y = rng.binomial(trials, mu) / np.where(zero, 1, trials)
        elif name == "Gamma":
            shape = np.where(zero, 1.0, w) / phi
            y = rng.gamma(shape, mu / shape)
        elif name == "InverseGaussian":
            # numpy's Wald distribution is the inverse Gaussian (mean, shape)
            y = rng.wald(mu, np.where(zero, 1.0, w) / phi)
        elif name == "Normal":
            y = mu + np.sqrt(phi / np.where(zero, 1.0, w)) * rng.standard_normal(mu.size)
        else:
            raise NotImplementedError(f"simulating the {name} family is not implemented")
        return np.where(zero, self.y_observed, y)


def _check_count(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative whole number, not {n!r}")
    return int(n)
