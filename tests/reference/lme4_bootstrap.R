# lme4's parametric bootstrap of sleepstudy_ml, the reference of
# tests/test_inference_bootstrap.py (LME4_BOOT there).
# usage (from the repository root): Rscript tests/reference/lme4_bootstrap.R
#   optional arguments: OUT.json (default tests/reference/lme4_bootstrap.json), NSIM (default 10000)
# Needs Debian's r-base-core, r-cran-lme4, r-cran-jsonlite. Takes a few minutes (10,000 refits).
#
# bootMer refits the ML fit of reaction ~ 1 + days + (1 + days | subj) to NSIM responses
# simulated from it (seed 20240601) and keeps, per replicate, the variance parameters and
# fixed effects under lme4's confint(oldNames = FALSE) names. Per column, over the finite
# values x (N of them): the 2.5% and 97.5% quantiles (R's type 7, numpy's default), their
# Monte Carlo standard errors sqrt(p(1-p)/N) * (Q(p+.01) - Q(p-.01)) / .02 (the density at
# the quantile from a difference of neighbouring quantiles), and the mean and s.d., all
# rounded to 8 decimals (a singular replicate's correlation, 1 to bobyqa's precision,
# is then 1; the test checks an endpoint at 1 exactly).
suppressMessages({library(lme4); library(jsonlite)})
args <- commandArgs(TRUE)
out <- if (length(args) >= 1) args[1] else file.path("tests", "reference", "lme4_bootstrap.json")
nsim <- if (length(args) >= 2) as.integer(args[2]) else 10000L
seed <- 20240601L
data_file <- file.path("src", "mixedmodels", "datasets", "data", "sleepstudy.csv.gz")
if (!file.exists(data_file)) stop("run from the repository root (", data_file, " not found)")

sleepstudy <- read.csv(gzfile(data_file), stringsAsFactors = TRUE)
fit <- lmer(reaction ~ 1 + days + (1 + days | subj), sleepstudy, REML = FALSE,
            control = lmerControl(optimizer = "bobyqa", calc.derivs = FALSE))
columns <- c("sd_(Intercept)|subj", "cor_days.(Intercept)|subj", "sd_days|subj", "sigma",
             "(Intercept)", "days")
fun <- function(m) {
  vc <- VarCorr(m)$subj
  s <- attr(vc, "stddev")
  setNames(c(s[1], attr(vc, "correlation")[2, 1], s[2], sigma(m), fixef(m)), columns)
}
t0 <- proc.time()[["elapsed"]]
bm <- suppressMessages(bootMer(fit, fun, nsim = nsim, seed = seed))
elapsed <- proc.time()[["elapsed"]] - t0

q7 <- function(x, p) unname(quantile(x, p, type = 7))
summarise <- function(x) {
  x <- x[is.finite(x)]
  n <- length(x)
  se <- function(p) sqrt(p * (1 - p) / n) * (q7(x, p + 0.01) - q7(x, p - 0.01)) / 0.02
  r8 <- function(v) round(v, 8)
  list(lower = r8(q7(x, 0.025)), upper = r8(q7(x, 0.975)), se_lower = r8(se(0.025)),
       se_upper = r8(se(0.975)), mean = r8(mean(x)), sd = r8(sd(x)), n = n)
}
res <- list(
  description = paste("lme4 bootMer of sleepstudy_ml: per column, the 2.5% and 97.5% quantiles",
                      "(type 7) of the finite replicates, their Monte Carlo s.e.",
                      "sqrt(p(1-p)/n) * (Q(p+.01) - Q(p-.01)) / .02, mean, sd, n"),
  script = "tests/reference/lme4_bootstrap.R",
  model = list(name = "sleepstudy_ml", formula = "reaction ~ 1 + days + (1 + days | subj)",
               REML = FALSE, data = data_file,
               control = "lmerControl(optimizer = \"bobyqa\", calc.derivs = FALSE)"),
  nsim = nsim, seed = seed,
  n_failed = sum(!stats::complete.cases(bm$t)),
  versions = list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                  Matrix = as.character(packageVersion("Matrix"))),
  elapsed_seconds = elapsed,
  columns = setNames(lapply(columns, function(nm) summarise(bm$t[, nm])), columns))
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), out)
cat(sprintf("%d replicates in %.0f s; wrote %s\n", nsim, elapsed, out))
