# Extra reference fits: correlated random slopes in a Bernoulli GLMM (Hessian vs conditional SEs),
# a simulated Gamma GLMM, a binomial GLMM with 88,000 trials per row, a singular 2x2 LMM, an LMM
# with an offset, and what lme4 says for some degenerate inputs (the `messages` block).
# usage (from the repository root): Rscript tests/reference/extra_fits.R [PUBLIC_DATA_DIR] [OUT.json]
#   PUBLIC_DATA_DIR: where ergostool.csv.gz lives (default /work/shared/data); the other public data
#   sets are read from src/mixedmodels/datasets/data. OUT.json defaults to tests/reference/extra_public.json.
# Simulated (and derived) data sets are written to tests/reference/data/ when missing; when present,
# the file is read and checked against the regenerated data. Every fit uses the data as read back from
# the CSV, so the numbers are those of the stored file.
# Needs Debian's r-base-core 4.2.2, r-cran-lme4 1.1-31, r-cran-glmmtmb 1.1.5, r-cran-jsonlite, r-cran-numderiv.
suppressMessages({library(lme4); library(glmmTMB); library(jsonlite); library(numDeriv)})
args <- commandArgs(TRUE)
pub_dir <- if (length(args) >= 1) args[1] else "/work/shared/data"
out <- if (length(args) >= 2) args[2] else "tests/reference/extra_public.json"
pkg_dir <- "src/mixedmodels/datasets/data"
ref_dir <- "tests/reference/data"
dir.create(ref_dir, showWarnings = FALSE, recursive = TRUE)

rd_public <- function(n) {
  f <- file.path(pkg_dir, paste0(n, ".csv.gz"))
  if (!file.exists(f)) f <- file.path(pub_dir, paste0(n, ".csv.gz"))
  read.csv(gzfile(f), stringsAsFactors = TRUE)
}
rd_ref <- function(n) read.csv(gzfile(file.path(ref_dir, paste0(n, ".csv.gz"))), stringsAsFactors = TRUE)

# Write a data frame as gzip CSV: character/factor columns quoted, numbers with %.15g (the simulated
# values are rounded to at most 10 significant digits first, so every reader gets the same doubles).
write_ref <- function(d, n) {
  f <- file.path(ref_dir, paste0(n, ".csv.gz"))
  cols <- lapply(d, function(v) if (is.numeric(v)) sprintf("%.15g", v) else paste0('"', as.character(v), '"'))
  lines <- c(paste0('"', names(d), '"', collapse = ","), do.call(paste, c(cols, sep = ",")))
  if (file.exists(f)) {
    old <- rd_ref(n)
    same <- identical(dim(old), dim(d)) && all(mapply(function(a, b) {
      if (is.numeric(b)) isTRUE(all(as.numeric(a) == b)) else all(as.character(a) == as.character(b))
    }, old, d))
    if (!same) stop(f, " exists but differs from the regenerated data; delete it to rewrite")
    cat(sprintf("%-28s present, matches the regenerated data\n", basename(f)))
  } else {
    con <- gzfile(f, "w"); writeLines(lines, con); close(con)
    cat(sprintf("%-28s written\n", basename(f)))
  }
  back <- rd_ref(n)
  for (v in names(d)) if (is.numeric(d[[v]]) && !isTRUE(all(back[[v]] == d[[v]])))
    stop("round trip of ", n, "$", v, " is not exact")
  back
}

# Run an expression, collecting warnings and messages; an error is returned as its message.
capture <- function(expr) {
  w <- character(); m <- character(); err <- NULL
  val <- withCallingHandlers(
    tryCatch(expr, error = function(e) { err <<- conditionMessage(e); NULL }),
    warning = function(c) { w <<- c(w, conditionMessage(c)); invokeRestart("muffleWarning") },
    message = function(c) { m <<- c(m, conditionMessage(c)); invokeRestart("muffleMessage") })
  list(value = val, error = err, warnings = w, messages = m)
}

lctl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10, maxfun = 1e5))
gctl <- glmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10, maxfun = 1e5), tolPwrss = 1e-10)

# lme4's Lambda parameter from a covariance matrix: lower Cholesky factor, lower triangle by columns.
chol_lower <- function(S) { L <- t(chol(S)); L[lower.tri(L, diag = TRUE)] }
A <- function(x) if (is.null(x)) x else I(x)  # always a JSON array, even of length 1
num_or_str <- function(x) if (is.finite(x)) x else as.character(x)  # keep Inf / NaN visible in JSON

lme4_record <- function(cap, seconds) {
  fit <- cap$value
  cf <- summary(fit)$coefficients
  vH <- capture(vcov(fit))                          # lme4's default (the summary's SEs)
  vC <- capture(vcov(fit, use.hessian = FALSE))     # from RX: conditional on theta
  h <- fit@optinfo$derivs$Hessian
  hess_avail <- !is.null(h) && nrow(h) > length(getME(fit, "theta"))
  vc <- as.data.frame(VarCorr(fit))
  vc$var1[is.na(vc$var1)] <- ""; vc$var2[is.na(vc$var2)] <- ""
  VC <- VarCorr(fit)
  gl <- isGLMM(fit)
  list(version = as.character(packageVersion("lme4")),
       objective = num_or_str(-2 * as.numeric(logLik(fit))),
       reml_criterion = if (isREML(fit)) num_or_str(as.numeric(REMLcrit(fit))) else NULL,
       REML = isREML(fit),
       coef_names = A(rownames(cf)), coef = A(unname(cf[, 1])),
       stderror = A(unname(cf[, 2])),
       stderror_vcov_default = A(unname(sqrt(diag(as.matrix(vH$value))))),
       stderror_uses_hessian = gl && hess_avail,
       stderror_conditional = A(unname(sqrt(diag(as.matrix(vC$value))))),
       vcov_warnings = A(c(vH$warnings, vC$warnings)),
       theta = A(unname(getME(fit, "theta"))), theta_names = A(names(getME(fit, "theta"))),
       sigma = if (!gl || !(family(fit)$family %in% c("binomial", "poisson"))) sigma(fit) else NULL,
       re_sd = lapply(VC, function(v) A(unname(attr(v, "stddev")))),
       re_cor = lapply(VC, function(v) { cc <- attr(v, "correlation"); if (is.null(cc) || nrow(cc) < 2) NULL else A(unname(cc[lower.tri(cc)])) }),
       varcorr = lapply(seq_len(nrow(vc)), function(i) list(group = vc$grp[i], var1 = vc$var1[i], var2 = vc$var2[i], vcov = vc$vcov[i], sdcor = vc$sdcor[i])),
       isSingular = isSingular(fit), nobs = nobs(fit), ngroups = as.list(getME(fit, "l_i")),
       derivs = list(gradient = A(unname(fit@optinfo$derivs$gradient)),
                     Hessian = if (is.null(h)) NULL else unname(h),
                     order = if (gl && hess_avail) "theta then beta" else "theta"),
       optimizer = list(name = fit@optinfo$optimizer, code = fit@optinfo$conv$opt, feval = fit@optinfo$feval,
                        warnings = A(as.character(unlist(fit@optinfo$warnings)))),
       convergence_code = fit@optinfo$conv$lme4$code,
       convergence_messages = A(as.character(fit@optinfo$conv$lme4$messages)),
       fit_warnings = A(cap$warnings), fit_messages = A(cap$messages),
       control = if (gl) "glmerControl(optimizer = 'bobyqa', optCtrl = list(rhoend = 1e-10, maxfun = 1e5), tolPwrss = 1e-10)"
                 else "lmerControl(optimizer = 'bobyqa', optCtrl = list(rhoend = 1e-10, maxfun = 1e5))",
       fit_seconds = seconds)
}

glmmtmb_record <- function(cap, seconds) {
  fit <- cap$value
  cf <- summary(fit)$coefficients$cond
  vc <- VarCorr(fit)$cond
  fam <- family(fit)$family
  sc <- if (fam %in% c("binomial", "poisson")) 1 else sigma(fit)
  list(version = as.character(packageVersion("glmmTMB")),
       objective = -2 * as.numeric(logLik(fit)),
       coef_names = A(rownames(cf)), coef = A(unname(cf[, 1])), stderror = A(unname(cf[, 2])),
       theta = A(unname(unlist(lapply(vc, function(S) chol_lower(S[, , drop = FALSE] / sc^2))))),
       theta_glmmTMB = A(unname(fit$fit$par[names(fit$fit$par) == "theta"])),
       sigma = if (fam %in% c("binomial", "poisson")) NULL else unname(sigma(fit)),
       re_sd = lapply(vc, function(v) A(unname(attr(v, "stddev")))),
       re_cor = lapply(vc, function(v) { cc <- attr(v, "correlation"); if (is.null(cc) || nrow(cc) < 2) NULL else A(unname(cc[lower.tri(cc)])) }),
       nobs = nobs(fit), pdHess = fit$sdr$pdHess,
       convergence = fit$fit$convergence, optimizer_message = fit$fit$message,
       fit_warnings = A(cap$warnings), fit_messages = A(cap$messages), fit_seconds = seconds)
}

# For a GLMM: the Hessian of lme4's own Laplace deviance function over (theta, beta) by Richardson
# extrapolation (numDeriv), at lme4's optimum. lme4's summary SEs come from a plain central-difference
# Hessian with step 1e-4 (optinfo$derivs), which is biased when a coefficient's scale is large.
richardson <- function(fit, devfun) {
  p <- c(unname(getME(fit, "theta")), unname(fixef(fit)))
  nt <- length(getME(fit, "theta"))
  H <- numDeriv::hessian(devfun, p, method.args = list(r = 6))
  g <- numDeriv::grad(devfun, p, method.args = list(r = 6))
  V <- solve(H / 2)
  list(stderror_richardson = A(unname(sqrt(diag(V))[-seq_len(nt)])), gradient_richardson = A(g),
       richardson_note = "sqrt(diag(solve(H / 2)))[beta], H = numDeriv::hessian(devfun, c(theta, beta), r = 6) of glmer(..., devFunOnly = TRUE)")
}

timed <- function(expr) { t0 <- proc.time()[["elapsed"]]; cap <- capture(expr)
  if (!is.null(cap$error)) stop(cap$error); list(cap = cap, s = proc.time()[["elapsed"]] - t0) }

fits <- list()
add <- function(entry) {
  fits[[length(fits) + 1]] <<- entry
  for (e in intersect(c("lme4", "glmmTMB"), names(entry))) {
    r <- entry[[e]]
    cat(sprintf("%-32s %-8s obj %.10g  %.2fs%s\n", entry$name, e, as.numeric(r$objective), r$fit_seconds,
                if (length(r$fit_warnings)) paste0("  [warning: ", paste(r$fit_warnings, collapse = "; "), "]") else ""))
  }
}

## 1. contra: correlated random slopes for urban, Bernoulli ##################################
contra <- rd_public("contra")
contra$livch <- factor(as.character(contra$livch), levels = c("0", "1", "2", "3+"))
contra$urban <- factor(as.character(contra$urban), levels = c("N", "Y"))
contra$use <- factor(as.character(contra$use), levels = c("N", "Y"))   # "Y" is the success
f1 <- "use ~ 1 + age + I(age^2) + urban + livch + (1 + urban | dist)"
a <- timed(glmer(as.formula(f1), contra, family = binomial(), control = gctl))
b <- timed(glmmTMB(as.formula(f1), contra, family = binomial()))
dv <- glmer(as.formula(f1), contra, family = binomial(), control = gctl, devFunOnly = TRUE)
add(list(name = "contra_slopes_bernoulli", data = "contra", formula = f1, family = "bernoulli", link = "logit",
         nAGQ = 1, contrasts = "treatment (R default): urban N baseline, livch 0 baseline; use Y = 1",
         lme4 = c(lme4_record(a$cap, a$s), richardson(a$cap$value, dv)), glmmTMB = glmmtmb_record(b$cap, b$s)))

## 2. gamma_sim: simulated Gamma GLMM, log link ##############################################
RNGkind("Mersenne-Twister", "Inversion", "Rejection")
set.seed(20240501)
ng <- 40; per <- 25
g <- rep(sprintf("g%02d", seq_len(ng)), each = per)
x <- round(rnorm(ng * per), 6)
b_g <- rnorm(ng, 0, 0.3)
mu <- exp(1 + 0.5 * x + b_g[rep(seq_len(ng), each = per)])
shape <- 4
y <- signif(rgamma(ng * per, shape = shape, rate = shape / mu), 10)
gam <- write_ref(data.frame(g = g, x = x, y = y), "gamma_sim")
f2 <- "y ~ 1 + x + (1 | g)"
b <- timed(glmmTMB(as.formula(f2), gam, family = Gamma(link = "log")))
add(list(name = "gamma_sim", data = "gamma_sim", data_file = "tests/reference/data/gamma_sim.csv.gz",
         formula = f2, family = "gamma", link = "log",
         simulation = list(seed = 20240501, groups = ng, per_group = per, beta = c(1, 0.5), sd_g = 0.3, shape = shape,
                           note = "x ~ N(0,1) rounded to 6 decimals; y ~ Gamma(shape 4, mean mu) rounded to 10 significant digits"),
         glmmTMB = c(glmmtmb_record(b$cap, b$s),
                     list(sigma_meaning = "Gamma: the coefficient of variation (shape = 1/sigma^2, phi = sigma^2); theta = chol(Sigma_b) / sigma (lme4's convention)"))))

## 3. binomial_88k: 88,000 trials per row ####################################################
set.seed(88000)
ng <- 20; per <- 8; trials <- 88000L
g <- rep(sprintf("g%02d", seq_len(ng)), each = per)
x <- round(rnorm(ng * per), 6)
b_g <- rnorm(ng, 0, 0.5)
p <- plogis(-1 + 0.3 * x + b_g[rep(seq_len(ng), each = per)])
succ <- rbinom(ng * per, trials, p)
bin <- write_ref(data.frame(g = g, x = x, successes = succ, trials = rep(trials, ng * per)), "binomial_88k")
f3 <- "cbind(successes, trials - successes) ~ 1 + x + (1 | g)"
a <- timed(glmer(as.formula(f3), bin, family = binomial(), control = gctl))
b <- timed(glmmTMB(as.formula(f3), bin, family = binomial()))
add(list(name = "binomial_88k", data = "binomial_88k", data_file = "tests/reference/data/binomial_88k.csv.gz",
         formula = f3, family = "binomial", link = "logit",
         simulation = list(seed = 88000, groups = ng, per_group = per, trials = trials, beta = c(-1, 0.3), sd_g = 0.5,
                           note = "x ~ N(0,1) rounded to 6 decimals; successes ~ Binomial(88000, plogis(-1 + 0.3 x + b_g))"),
         lme4 = c(lme4_record(a$cap, a$s),
                  richardson(a$cap$value, glmer(as.formula(f3), bin, family = binomial(), control = gctl, devFunOnly = TRUE))),
         glmmTMB = glmmtmb_record(b$cap, b$s)))

## 4. singular_slope: ergostool with a subject slope for type T3; correlation +1 ##############
if (file.exists(file.path(pub_dir, "ergostool.csv.gz"))) {
  ergo <- rd_public("ergostool")
  ergo <- data.frame(subject = as.character(ergo$subject), type = as.character(ergo$type),
                     effort = ergo$effort, t3 = as.numeric(ergo$type == "T3"))
  ergo <- write_ref(ergo, "ergostool_t3")
} else ergo <- rd_ref("ergostool_t3")   # the public copy is not at hand: use the stored file
f4 <- "effort ~ 1 + type + (1 + t3 | subject)"
for (reml in c(FALSE, TRUE)) {
  a <- timed(lmer(as.formula(f4), ergo, REML = reml, control = lctl))
  add(list(name = if (reml) "singular_slope_reml" else "singular_slope", data = "ergostool_t3",
           data_file = "tests/reference/data/ergostool_t3.csv.gz", formula = f4, family = "gaussian", REML = reml,
           note = "nlme::ergoStool with t3 = (type == 'T3'); the optimum is on the boundary: theta[3] = 0, correlation +1",
           lme4 = lme4_record(a$cap, a$s)))
}

## 6. sleepstudy_lmm_offset_ml ###############################################################
sleep <- rd_public("sleepstudy")
f6 <- "reaction ~ 1 + days + offset(2 * days) + (1 | subj)"
a <- timed(lmer(as.formula(f6), sleep, REML = FALSE, control = lctl))
add(list(name = "sleepstudy_lmm_offset_ml", data = "sleepstudy", formula = f6, family = "gaussian", REML = FALSE,
         offset = "2 * days", lme4 = lme4_record(a$cap, a$s)))

## 5. messages: what lme4 does with degenerate input #########################################
msg_entry <- function(cap) list(error = cap$error, warnings = A(cap$warnings), messages = A(cap$messages),
                                fitted = !is.null(cap$value))
messages <- list()

s0 <- sleep; s0$y <- 0
fa <- "y ~ 1 + days + (1 | subj)"
messages$poisson_all_zero <- c(list(data = "sleepstudy with y = 0 on every row", formula = fa, family = "poisson",
  call = "glmer(y ~ 1 + days + (1 | subj), data, family = poisson(), control = gctl)"),
  msg_entry(capture(glmer(as.formula(fa), s0, family = poisson(), control = gctl))))

s1 <- sleep; s1$y <- 1
messages$bernoulli_all_one <- c(list(data = "sleepstudy with y = 1 on every row", formula = fa, family = "bernoulli",
  call = "glmer(y ~ 1 + days + (1 | subj), data, family = binomial(), control = gctl)"),
  msg_entry(capture(glmer(as.formula(fa), s1, family = binomial(), control = gctl))))

set.seed(15)
small <- data.frame(g = sprintf("g%02d", c(1:15, 1:5)), x = round(rnorm(20), 6))
small$y <- rbinom(20, 1, 0.5)
fc <- "y ~ 1 + x + (1 + x | g)"
messages$more_re_than_obs <- c(list(data = "20 rows, 15 groups (g01..g15, then g01..g05 again); inline below", formula = fc,
  family = "bernoulli", rows = small,
  call = "glmer(y ~ 1 + x + (1 + x | g), data, family = binomial(), control = gctl)"),
  msg_entry(capture(glmer(as.formula(fc), small, family = binomial(), control = gctl))))

sw <- sleep; sw$w <- 1; zero_rows <- seq(5, 180, by = 18); sw$w[zero_rows] <- 0
fd <- "reaction ~ 1 + days + (1 | subj)"
cw <- capture(lmer(as.formula(fd), sw, weights = w, REML = FALSE, control = lctl))
cd <- capture(lmer(as.formula(fd), sw[sw$w > 0, ], REML = FALSE, control = lctl))
summ <- function(cap) { fit <- cap$value
  list(objective = num_or_str(-2 * as.numeric(logLik(fit))), coef = A(unname(fixef(fit))), theta = A(unname(getME(fit, "theta"))),
       sigma = sigma(fit), nobs = nobs(fit), df_residual = df.residual(fit),
       optimizer_feval = fit@optinfo$feval, convergence_messages = A(as.character(fit@optinfo$conv$lme4$messages)),
       gradient = A(unname(fit@optinfo$derivs$gradient)),
       fit_warnings = A(cap$warnings), fit_messages = A(cap$messages), error = cap$error) }
wsum <- summ(cw); dsum <- summ(cd)
messages$lmm_zero_weights <- list(data = "sleepstudy, weight 0 on rows 5, 23, 41, ..., 167 (seq(5, 180, by = 18), 1-based), 1 elsewhere",
  formula = fd, REML = FALSE,
  call_weighted = "lmer(reaction ~ 1 + days + (1 | subj), data, weights = w, REML = FALSE, control = lctl)",
  call_dropped = "lmer(reaction ~ 1 + days + (1 | subj), data[data$w > 0, ], REML = FALSE, control = lctl)",
  zero_weight_rows = A(zero_rows),
  weighted = wsum, dropped = dsum,
  rows_dropped_by_lme4 = wsum$nobs < 180,
  same_fit = isTRUE(all.equal(wsum$coef, dsum$coef, tolerance = 1e-8)) && isTRUE(all.equal(wsum$theta, dsum$theta, tolerance = 1e-8)),
  note = paste("lme4 keeps zero-weight rows (nobs 180) and its deviance has -sum(log(w)) = +Inf, so the",
               "objective is Inf at every theta; bobyqa stops after a few evaluations at an arbitrary theta,",
               "with 'Gradient contains NAs' recorded in optinfo (no R warning is raised). The fit is not the",
               "fit without those rows."))

co <- capture(lmer(as.formula(f6), sleep, REML = FALSE, control = lctl))
messages$lmm_offset <- list(data = "sleepstudy", formula = f6, REML = FALSE,
  call = "lmer(reaction ~ 1 + days + offset(2 * days) + (1 | subj), data, REML = FALSE, control = lctl)",
  objective = -2 * as.numeric(logLik(co$value)), coef_names = A(names(fixef(co$value))), coef = A(unname(fixef(co$value))),
  theta = A(unname(getME(co$value, "theta"))), sigma = sigma(co$value), fit_warnings = A(co$warnings),
  see = "fits: sleepstudy_lmm_offset_ml")

for (n in names(messages)) {
  m <- messages[[n]]
  cat(sprintf("%-20s %s\n", n, if (!is.null(m$error)) paste("error:", m$error)
              else if (!is.null(m$objective)) paste("objective", m$objective)
              else if (!is.null(m$weighted)) sprintf("weighted obj %s, dropped obj %s", m$weighted$objective, m$dropped$objective)
              else "fitted"))
}

res <- list(
  description = paste("Extra reference fits from lme4 (tight bobyqa settings) and glmmTMB. objective = -2 log L",
                      "(the REML criterion is in reml_criterion). lme4 stderror is summary()'s, which for GLMMs comes",
                      "from the finite-difference Hessian over (theta, beta) (stderror_uses_hessian); stderror_conditional",
                      "is vcov(fit, use.hessian = FALSE), from RX at the optimal theta. glmmTMB stderror is from its",
                      "sdreport Hessian. theta is lme4's getME(fit, 'theta'); for glmmTMB it is the lower Cholesky factor",
                      "of each term's covariance (divided by sigma^2 first for families with a scale), lower triangle",
                      "by columns, and theta_glmmTMB is glmmTMB's own parameter vector (log sds, then correlation",
                      "parameters). derivs are lme4's optinfo$derivs (gradient and Hessian of the objective, central",
                      "differences with step 1e-4); stderror_richardson and gradient_richardson come from a Richardson",
                      "Hessian/gradient of lme4's own deviance function at lme4's optimum, for GLMMs."),
  generated_by = "Rscript tests/reference/extra_fits.R",
  R_version = R.version.string,
  versions = list(lme4 = as.character(packageVersion("lme4")), glmmTMB = as.character(packageVersion("glmmTMB")),
                  Matrix = as.character(packageVersion("Matrix")), TMB = as.character(packageVersion("TMB"))),
  fits = fits, messages = messages)
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "string",
                  dataframe = "columns"), out)
cat("wrote", out, "\n")
