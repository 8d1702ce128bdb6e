# The R worker of the inference benchmark (benchmarks/inference.py): one persistent
# Rscript process per library, `Rscript r_inference.R LIB` with LIB one of
#   lme4      confint(m, method = "profile"), bootMer, glmer.nb
#   lmerTest  summary(m, ddf = "Satterthwaite") (and as_lmerModLmerTest, its derivatives)
#   glmmTMB   glmmTMB(..., family = nbinom2)
# Only that library (and its dependencies) is loaded.
#
# Protocol: one JSON request per line on stdin, one answer per request on stdout as a
# line "@@ {json}"; everything else R prints goes to stderr or is muffled.
#   {"op": "prepare", "task": ID, "data_dir": DIR, "n": N}  read and prepare the data (not timed)
#   {"op": "run", "seed": S, "n": N}                       untimed set-up, then the timed call
#   {"op": "quit"}
# Each run reports the wall time of the timed call, the process CPU time over it (user +
# system, every thread) and the CPU ticks of each thread of the process before and after
# (from /proc/self/task), so the driver can check that one thread did the work.
# Every call is made with the library's default settings, as users run it.
args <- commandArgs(TRUE)
LIB <- args[1]
suppressPackageStartupMessages({
  library(jsonlite)
  if (LIB == "lme4") library(lme4)
  if (LIB == "lmerTest") { library(lme4); library(lmerTest) }
  if (LIB == "glmmTMB") library(glmmTMB)
})

proto <- stdout()
out <- function(x) {
  cat("@@ ", toJSON(x, auto_unbox = TRUE, digits = NA, null = "null", na = "null"), "\n",
      sep = "", file = proto)
  flush(proto)
}

thread_ticks <- function() {
  tids <- list.files("/proc/self/task")
  ticks <- vapply(tids, function(t) {
    s <- tryCatch(readLines(file.path("/proc/self/task", t, "stat"), warn = FALSE),
                  error = function(e) "")
    if (!nzchar(s[1])) return(NA_real_)
    f <- strsplit(sub(".*\\) ", "", s[1]), " ", fixed = TRUE)[[1]]
    as.numeric(f[12]) + as.numeric(f[13])     # utime + stime (fields 14, 15 of stat)
  }, 0)
  as.list(ticks)
}

# Data preparation, as r_worker.R (and problems.prepare): bundled CSVs, strings as factors.
rd <- function(dir, name) read.csv(gzfile(file.path(dir, paste0(name, ".csv.gz"))), stringsAsFactors = TRUE)

SLEEP <- reaction ~ 1 + days + (1 + days | subj)
CBPP <- prop ~ 1 + period + (1 | herd)
INSTEVAL <- y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)
TICKS <- ticks ~ 1 + year + ch + (1 | brood) + (1 | location)
boot_fun <- function(x) c(fixef(x), getME(x, "theta"), sigma(x))

TASK <- NULL; D <- NULL; FIT <- NULL

quiet <- function(expr) {
  warns <- character()
  val <- withCallingHandlers(expr,
    warning = function(w) { warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning") },
    message = function(m) invokeRestart("muffleMessage"))
  list(value = val, warnings = unique(warns))
}

ci_result <- function(ci) list(names = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2]))

# Each task: set-up (not timed) and the timed call, returning list(value, extra).
setup_run <- function(task, req) {
  if (task == "profile/sleepstudy") {
    m <- quiet(lme4::lmer(SLEEP, D, REML = FALSE))$value
    list(call = function() confint(m, method = "profile"),
         result = function(ci) ci_result(ci))
  } else if (task == "profile/cbpp") {
    m <- quiet(glmer(CBPP, D, family = binomial, weights = hsz))$value
    list(call = function() confint(m, method = "profile"),
         result = function(ci) ci_result(ci))
  } else if (task == "bootstrap/sleepstudy") {
    m <- quiet(lme4::lmer(SLEEP, D, REML = FALSE))$value
    set.seed(req$seed)
    n <- req$n
    list(call = function() bootMer(m, FUN = boot_fun, nsim = n),
         result = function(b) {
           ok <- stats::complete.cases(b$t)
           list(n = nrow(b$t), n_failed = sum(!ok), columns = colnames(b$t),
                mean = unname(colMeans(b$t[ok, , drop = FALSE])),
                q025 = unname(apply(b$t[ok, , drop = FALSE], 2, quantile, 0.025)),
                q975 = unname(apply(b$t[ok, , drop = FALSE], 2, quantile, 0.975)))
         })
  } else if (task == "satterthwaite/insteval") {
    # FIT: the lme4 fit made once at prepare (not timed). lmerTest::lmer is lme4::lmer
    # followed by as_lmerModLmerTest, which computes the derivatives Satterthwaite's
    # method needs; summary() combines them. Both are timed, separately.
    c0 <- proc.time()
    t0 <- as.numeric(Sys.time())
    mt <- as_lmerModLmerTest(FIT)
    t_derivs <- as.numeric(Sys.time()) - t0
    c1 <- proc.time()
    cpu_derivs <- (c1[["user.self"]] - c0[["user.self"]]) + (c1[["sys.self"]] - c0[["sys.self"]])
    list(call = function() summary(mt, ddf = "Satterthwaite"),
         extra = list(time_derivatives = t_derivs, cpu_derivatives = cpu_derivs),
         result = function(s) {
           cf <- coef(s)
           list(names = rownames(cf), estimate = unname(cf[, "Estimate"]),
                se = unname(cf[, "Std. Error"]), df = unname(cf[, "df"]),
                t = unname(cf[, "t value"]))
         })
  } else if (task == "negbin/grouseticks") {
    if (LIB == "lme4") {
      list(call = function() glmer.nb(TICKS, D),
           result = function(m) list(objective = -2 * as.numeric(logLik(m)),
                                     nb_theta = unname(getME(m, "glmer.nb.theta")),
                                     coef = unname(fixef(m))))
    } else {
      list(call = function() glmmTMB(TICKS, D, family = nbinom2),
           result = function(m) list(objective = -2 * as.numeric(logLik(m)),
                                     nb_theta = unname(sigma(m)),
                                     coef = unname(fixef(m)$cond)))
    }
  } else stop("unknown task ", task)
}

run_once <- function(req) {
  s <- setup_run(TASK, req)
  gc()
  ticks0 <- thread_ticks()
  c0 <- proc.time()
  t0 <- as.numeric(Sys.time())
  r <- quiet(s$call())
  el <- as.numeric(Sys.time()) - t0
  c1 <- proc.time()
  ticks1 <- thread_ticks()
  cpu <- (c1[["user.self"]] - c0[["user.self"]]) + (c1[["sys.self"]] - c0[["sys.self"]])
  res <- list(ok = TRUE, time = el, cpu = cpu, pid = Sys.getpid(),
              ticks_before = ticks0, ticks_after = ticks1,
              warnings = paste(r$warnings, collapse = " | "),
              result = s$result(r$value))
  c(res, s$extra)
}

con <- file("stdin")
open(con)
out(list(ok = TRUE, lib = LIB, pid = Sys.getpid(),
         version = as.character(packageVersion(LIB)),
         versions = list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                         Matrix = as.character(packageVersion("Matrix")),
                         lmerTest = if (LIB == "lmerTest") as.character(packageVersion("lmerTest")) else NULL,
                         glmmTMB = if (LIB == "glmmTMB") as.character(packageVersion("glmmTMB")) else NULL,
                         TMB = if (LIB == "glmmTMB") as.character(packageVersion("TMB")) else NULL),
         blas = extSoftVersion()[["BLAS"]]))
repeat {
  line <- readLines(con, n = 1)
  if (length(line) == 0) break
  req <- fromJSON(line)
  if (req$op == "quit") break
  tryCatch({
    if (req$op == "prepare") {
      TASK <- req$task
      FIT <- NULL
      D <- switch(TASK,
        "profile/sleepstudy" = , "bootstrap/sleepstudy" = rd(req$data_dir, "sleepstudy"),
        "profile/cbpp" = {
          d <- rd(req$data_dir, "cbpp"); d$prop <- d$incid / d$hsz; d$period <- factor(d$period); d
        },
        "satterthwaite/insteval" = rd(req$data_dir, "insteval"),
        "negbin/grouseticks" = {
          d <- rd(req$data_dir, "grouseticks"); d$ch <- d$height - mean(d$height)
          d$year <- factor(d$year); d
        },
        stop("unknown task ", TASK))
      if (TASK == "satterthwaite/insteval") FIT <- quiet(lme4::lmer(INSTEVAL, D))$value
      gc()
      out(list(ok = TRUE, task = TASK, rows = nrow(D)))
    } else if (req$op == "run") {
      out(run_once(req))
    } else {
      out(list(ok = FALSE, error = paste("unknown op", req$op)))
    }
  }, error = function(e) out(list(ok = FALSE, error = conditionMessage(e))))
}
