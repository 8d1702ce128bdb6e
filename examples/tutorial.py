"""The MixedModels.jl GLMM tutorial (shared/seed), in Python.

Fits the sleepstudy LMM the tutorial starts from, then the contraception models gm1, gm2
and gm3 (Bernoulli, adaptive Gauss-Hermite quadrature with 9 points), prints their tables
and ends with the tutorial's predictions for a typical district.

Run: python examples/tutorial.py
"""
import numpy as np
import pandas as pd

import mixedmodels as mm


def section(title):
    print()
    print(title)
    print("=" * len(title))


def main():
    section("A linear mixed model: sleepstudy")
    m1 = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
    print(m1)
    print()
    print(m1.varcorr)
    print(f"\ny has {len(m1.y)} elements, X is {m1.X.shape[0]} × {m1.X.shape[1]}, "
          f"Z is {m1.Z.shape[0]} × {m1.Z.shape[1]} ({m1.Z.nnz} nonzeros); "
          f"factorization: {m1.model.describe()}")

    section("The contraception survey (contra): Bernoulli GLMMs, nAGQ = 9")
    contra = mm.dataset("contra")
    contrasts = {"dist": mm.Grouping(), "urban": mm.HelmertCoding(), "livch": mm.DummyCoding()}
    gm1 = mm.fit("use ~ 1 + age + abs2(age) + urban + livch + (1 | dist)", contra,
                 family=mm.Bernoulli(), nAGQ=9, contrasts=contrasts)
    print("gm1")
    print(gm1)
    print()
    print(gm1.format_compact_table())
    print()
    print(gm1.varcorr)

    contra["children"] = contra.livch != "0"
    contrasts["children"] = mm.EffectsCoding()
    gm2 = mm.fit("use ~ 1 + age * children + abs2(age) + children + urban + (1 | dist)", contra,
                 family=mm.Bernoulli(), nAGQ=9, contrasts=contrasts)
    print("\ngm2")
    print(gm2.format_compact_table())
    gm3 = mm.fit("use ~ 1 + age * children + abs2(age) + children + urban + (1 | urban & dist)",
                 contra, family=mm.Bernoulli(), nAGQ=9, contrasts=contrasts)
    print("\ngm3")
    print(gm3.format_compact_table())
    print(f"\ndeviance: gm1 {gm1.deviance:.4f}, gm2 {gm2.deviance:.4f}, gm3 {gm3.deviance:.4f}")
    print(f"X of gm1 is {gm1.X.shape[0]} × {gm1.X.shape[1]}; Z is sparse, "
          f"{gm1.Z.shape[0]} × {gm1.Z.shape[1]}; "
          f"max |η - (Xβ + Zb)| = {np.max(np.abs(gm1.linpred() - (gm1.X @ gm1.coef + gm1.Z @ gm1.b))):.2g}")

    section("Predictions for a typical district (random effect zero), centred age 0")
    newdata = pd.DataFrame([(c, u) for c in (False, True) for u in ("N", "Y")],
                           columns=["children", "urban"])
    newdata["age"] = 0.0
    newdata["dist"] = "new district"
    newdata["livch"] = np.where(newdata.children, "1", "0")
    newdata["link"] = gm2.predict(newdata, type="link", new_levels="population")
    newdata["probability"] = gm2.predict(newdata, type="response", new_levels="population")
    print(newdata[["children", "urban", "link", "probability"]].to_string(index=False))
    print("\nmm.logistic of the linear predictors:", np.round(mm.logistic(newdata["link"].to_numpy()), 4))

    section("Likelihood-ratio tests")
    m0 = mm.fit("reaction ~ 1 + days + (1 | subj)", mm.dataset("sleepstudy"))
    print("Does the slope of days vary between subjects?")
    print(mm.lrtest(m0, m1))
    gm0 = mm.fit("use ~ 1 + age + abs2(age) + urban + (1 | dist)", contra,
                 family=mm.Bernoulli(), nAGQ=9, contrasts=contrasts)
    print("\nDoes the number of living children matter (gm0 against gm1)?")
    print(mm.lrtest(gm0, gm1))

    section("Profile-likelihood intervals (95%)")
    print("sleepstudy")
    print(m1.confint(method="profile").to_string(float_format=lambda v: f"{v:.4f}"))
    print("\ngm1")
    print(gm1.confint(method="profile").to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
