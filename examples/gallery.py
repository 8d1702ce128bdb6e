"""Every plot of mixedmodels.plots on the tutorial's models, written to docs/images/.

The models are those of examples/tutorial.py: the sleepstudy LMM and the contraception
GLMMs gm1, gm2 and gm3 (Bernoulli, nAGQ = 9). For each, a caterpillar plot, a normal QQ
plot of the conditional modes, the shrinkage plot, the likelihood profiles and the
residual diagnostics, as PNG files named <model>_<plot>.png. The README shows two of
them: sleepstudy_caterpillar.png and gm1_profile_sigma.png (the profile of gm1's σ_dist).

Run: python examples/gallery.py [output directory]   (needs pip install "mixedmodels[plot]")
"""
import sys
import time
from pathlib import Path

import mixedmodels as mm
from mixedmodels import plots

ROOT = Path(__file__).resolve().parents[1]


def models():
    """The tutorial's fits, by name."""
    out = {"sleepstudy": mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))}
    contra = mm.dataset("contra")
    contrasts = {"dist": mm.Grouping(), "urban": mm.HelmertCoding(), "livch": mm.DummyCoding()}
    out["gm1"] = mm.fit("use ~ 1 + age + abs2(age) + urban + livch + (1 | dist)", contra,
                        family=mm.Bernoulli(), nAGQ=9, contrasts=contrasts)
    contra["children"] = contra.livch != "0"
    contrasts["children"] = mm.EffectsCoding()
    out["gm2"] = mm.fit("use ~ 1 + age * children + abs2(age) + children + urban + (1 | dist)",
                        contra, family=mm.Bernoulli(), nAGQ=9, contrasts=contrasts)
    out["gm3"] = mm.fit("use ~ 1 + age * children + abs2(age) + children + urban + (1 | urban & dist)",
                        contra, family=mm.Bernoulli(), nAGQ=9, contrasts=contrasts)
    return out


def save(fig, path):
    fig.savefig(path, dpi=100)
    print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main(outdir):
    outdir.mkdir(parents=True, exist_ok=True)
    for name, fit in models().items():
        t0 = time.perf_counter()
        print(f"{name}: {fit.formula}")
        save(plots.caterpillar(fit), outdir / f"{name}_caterpillar.png")
        save(plots.qqcaterpillar(fit), outdir / f"{name}_qqcaterpillar.png")
        save(plots.shrinkage(fit), outdir / f"{name}_shrinkage.png")
        pr = fit.profile()
        save(plots.profile(pr), outdir / f"{name}_profile.png")
        save(plots.diagnostics(fit), outdir / f"{name}_diagnostics.png")
        if name == "gm1":
            # the README's picture: the profile of the district standard deviation alone
            fig = plots.profile(pr, which="sd_(Intercept)|dist")
            fig.set_size_inches(4.6, 3.6)
            fig.suptitle("gm1 (nAGQ = 9): profile of σ_dist, 95% interval", fontsize=10)
            save(fig, outdir / f"{name}_profile_sigma.png")
        print(f"  ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "images")
