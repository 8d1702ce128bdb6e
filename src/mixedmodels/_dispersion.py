"""What the families with a dispersion parameter (or a parameter of their own) need
beyond PIRLS.

The Laplace approximation uses the curvature of the integrand at the modes. PIRLS
iterates with the expected (Fisher) information  w μ'²/(φ V(μ));  the exact Hessian of
-ℓ_i with respect to η_i, the observed information, is

    W°_i = -∂²ℓ_i/∂η_i² = (w/φ) [ μ'²/V(μ) - (y - μ) (μ''/V(μ) - μ'² V'(μ)/V(μ)²) ],

which equals the expected one for a canonical link and differs otherwise (Gamma with a
log link: W° = w y/(φ μ) against w/φ). glmmTMB's Laplace approximation is built on the
exact Hessian, and so is ours for these families.

The formula holds for any family whose log density, as a function of μ, has the
derivative w (y - μ)/(φ V(μ)); the negative binomial with its θ held fixed is such a
family (V(μ) = μ + μ²/θ, φ = 1), so the same W° serves it at each trial θ.
"""
import numpy as np

_SQRT_2PI = np.sqrt(2.0 * np.pi)


def link_derivatives(link, eta, mu):
    """μ' = dμ/dη and μ'' = d²μ/dη² for a link, at η (with μ = g⁻¹(η))."""
    name = link.name
    if name == "identity":
        return np.ones_like(eta), np.zeros_like(eta)
    if name == "log":
        return mu, mu
    if name == "inverse":
        return -mu * mu, 2.0 * mu ** 3
    if name == "sqrt":
        return 2.0 * eta, np.full_like(eta, 2.0)
    if name == "inverse_square":
        return -0.5 * mu ** 3, 0.75 * mu ** 5
    if name == "logit":
        d1 = mu * (1.0 - mu)
        return d1, d1 * (1.0 - 2.0 * mu)
    if name == "probit":
        dens = np.exp(-0.5 * eta * eta) / _SQRT_2PI
        return dens, -eta * dens
    if name == "cloglog":
        e = np.exp(eta)
        d1 = np.exp(eta - e)
        return d1, d1 * (1.0 - e)
    raise ValueError(f"no second derivative known for the {name} link")


def variance_derivatives(family, mu):
    """V(μ) and V'(μ) of a family (for the negative binomial, at its current θ)."""
    name = family.name
    if name == "Gamma":
        return mu * mu, 2.0 * mu
    if name == "InverseGaussian":
        return mu ** 3, 3.0 * mu * mu
    if name == "Normal":
        return np.ones_like(mu), np.zeros_like(mu)
    if name == "Poisson":
        return mu, np.ones_like(mu)
    if name in ("Bernoulli", "Binomial"):
        return mu * (1.0 - mu), 1.0 - 2.0 * mu
    if name == "NegativeBinomial":
        theta = family.param
        if not (theta > 0.0 and np.isfinite(theta)):
            raise ValueError("the negative binomial variance needs a finite positive "
                             f"theta, got {theta} (set it with family.with_theta)")
        return mu * (1.0 + mu / theta), 1.0 + 2.0 * mu / theta
    raise ValueError(f"no variance function known for the {name} family")


def observed_weights(family, y, mu, eta, prior_w, phi):
    """W°_i = -∂²ℓ_i/∂η_i², the observed information per observation (see the module
    docstring); it can be negative for single observations far from their mean."""
    d1, d2 = link_derivatives(family.link, eta, mu)
    v, dv = variance_derivatives(family, mu)
    expected = d1 * d1 / v
    correction = (y - mu) * (d2 / v - d1 * d1 * dv / (v * v))
    return np.ascontiguousarray(prior_w / phi * (expected - correction))


def pearson_dispersion(family, y, mu, prior_w, dof):
    """Σ w (y - μ)²/V(μ) / dof, R's estimate of φ for a GLM: the starting value."""
    v, _ = variance_derivatives(family, mu)
    val = float(np.sum(prior_w * (y - mu) ** 2 / v) / max(dof, 1))
    return val if np.isfinite(val) and val > 0 else 1.0
