# lme4's conditional variances and modes for cbpp taken before any profiling: in lme4 1.1-31
# confint(method = "profile") leaves the fitted object changed, and lme4_inference.json's
# cbpp_binomial condvar entry was taken after it.
# usage (from tests/reference): Rscript cbpp_condvar.R ../../src/mixedmodels/datasets/data lme4_cbpp_condvar.json
suppressMessages({library(lme4); library(jsonlite)})
args <- commandArgs(TRUE)
d <- read.csv(gzfile(file.path(args[1], "cbpp.csv.gz")), stringsAsFactors = TRUE)
d$period <- factor(d$period)
m <- glmer(incid / hsz ~ 1 + period + (1 | herd), d, family = binomial, weights = hsz,
           control = glmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10),
                                  tolPwrss = 1e-10))
r <- ranef(m, condVar = TRUE)$herd
out <- list(lme4 = as.character(packageVersion("lme4")), levels = rownames(r),
            mode = unname(r[, 1]), condvar = unname(attr(r, "postVar")[1, 1, ]),
            theta = unname(getME(m, "theta")))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), args[2])
