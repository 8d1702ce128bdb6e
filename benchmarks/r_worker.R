# The lme4 worker: one persistent Rscript process that fits benchmark problems on request.
#
# Protocol (driven by benchmarks/run.py): one request per line on stdin, tab-separated,
#   load <TAB> key <TAB> value ...   read + prepare the data set (not timed), keep it
#   fit                              fit the loaded problem once, timed inside R
#   memfit                           as fit, and report the peak resident memory of the fit
#   evals                            set-up vs per-evaluation time (LMMs, through lFormula/mkLmerDevfun)
#   quit
# and one answer per request on stdout, a line "@@ {json}".  Everything else lme4 prints
# goes to stderr (or is ignored by the driver).
#
# lme4 is used with its DEFAULT settings, as users run it: lmer(formula, data, REML = ...)
# and glmer(formula, data, family = ..., nAGQ = ..., weights = ...), no control arguments
# (so the default optimizers, tolerances and calc.derivs = TRUE are part of the timing).
# A fit is timed from the data frame: formula parsing, model frame and model building,
# optimization and construction of the merMod result.
suppressPackageStartupMessages(library(lme4))

out <- function(...) {
  fields <- list(...)
  enc <- function(v) {
    if (is.null(v) || length(v) == 0) return("null")
    if (is.logical(v)) return(if (is.na(v)) "null" else if (v) "true" else "false")
    if (is.numeric(v)) return(if (!is.finite(v)) "null" else sprintf("%.17g", as.numeric(v)))
    s <- gsub("\\\\", "\\\\\\\\", as.character(v)); s <- gsub("\"", "\\\\\"", s)
    s <- gsub("[\r\n\t]", " ", s)
    paste0("\"", s, "\"")
  }
  body <- paste0("\"", names(fields), "\": ", vapply(fields, enc, ""), collapse = ", ")
  cat("@@ {", body, "}\n", sep = "")
  flush(stdout())
}

status_kb <- function(key) {
  l <- grep(paste0("^", key, ":"), readLines("/proc/self/status"), value = TRUE)
  as.numeric(strsplit(trimws(sub(".*:", "", l)), " +")[[1]][1])
}
reset_hwm <- function() {
  ok <- tryCatch({ cat("5", file = "/proc/self/clear_refs"); TRUE }, error = function(e) FALSE)
  ok
}

# Data preparation, the R twin of problems.prepare (as /work/shared/reference/spec_public.R).
read_bundled <- function(path) read.csv(gzfile(path), stringsAsFactors = TRUE)
read_generated <- function(dir) {
  meta <- strsplit(readLines(file.path(dir, "meta.txt")), " ")
  n <- as.integer(meta[[1]][2])
  d <- data.frame(y = readBin(file.path(dir, "y.f64"), "double", n, size = 8, endian = "little"),
                  x = readBin(file.path(dir, "x.f64"), "double", n, size = 8, endian = "little"))
  for (m in meta[-1]) {
    if (m[1] != "factor") next
    codes <- readBin(file.path(dir, paste0(m[2], ".i32")), "integer", n, size = 4, endian = "little")
    nlev <- as.integer(m[3])
    d[[m[2]]] <- factor(codes, levels = seq_len(nlev), labels = paste0(m[2], seq_len(nlev)))
  }
  d
}
prep <- function(d, name) {
  if (identical(name, "cbpp")) { d$prop <- d$incid / d$hsz; d$period <- factor(d$period) }
  if (identical(name, "grouseticks")) { d$ch <- d$height - mean(d$height); d$year <- factor(d$year) }
  d
}
contrast_matrix <- function(kind, lv) {
  switch(kind,
         helmert = contr.helmert(length(lv)),
         effects = contr.sum(length(lv)),
         dummy = contr.treatment(length(lv)))
}

P <- NULL      # the loaded problem
D <- NULL      # its data frame

do_fit <- function() {
  f <- as.formula(P$r_formula)
  if (P$family == "gaussian") {
    lmer(f, D, REML = P$REML)
  } else {
    fam <- switch(P$family, bernoulli = binomial(), binomial = binomial(), poisson = poisson())
    if (is.null(P$contrasts)) {
      if (is.null(P$weights)) glmer(f, D, family = fam, nAGQ = P$nAGQ)
      else glmer(f, D, family = fam, nAGQ = P$nAGQ, weights = D[[P$weights]])
    } else {
      if (is.null(P$weights)) glmer(f, D, family = fam, nAGQ = P$nAGQ, contrasts = P$contrasts)
      else glmer(f, D, family = fam, nAGQ = P$nAGQ, weights = D[[P$weights]], contrasts = P$contrasts)
    }
  }
}

fit_once <- function(mem = FALSE) {
  if (mem) { gc(full = TRUE); gc(full = TRUE); reset_ok <- reset_hwm(); base <- status_kb("VmRSS") }
  warns <- character()
  t0 <- as.numeric(Sys.time())
  m <- withCallingHandlers(tryCatch(do_fit(), error = function(e) e),
                           warning = function(w) { warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning") },
                           message = function(c) invokeRestart("muffleMessage"))
  el <- as.numeric(Sys.time()) - t0
  if (mem) hwm <- status_kb("VmHWM")
  if (inherits(m, "error")) return(out(ok = FALSE, error = conditionMessage(m), time = el))
  conv <- m@optinfo$conv$lme4
  feval <- m@optinfo$feval
  out(ok = TRUE, time = el, objective = -2 * as.numeric(logLik(m)),
      nfev = if (is.null(feval)) NA else feval,
      converged = identical(as.integer(m@optinfo$conv$opt), 0L),
      warnings = paste(unique(warns), collapse = " | "),
      singular = isSingular(m),
      peak_kb = if (mem) hwm - base else NA, base_kb = if (mem) base else NA,
      hwm_reset = if (mem) reset_ok else NA)
}

# Set-up vs per-evaluation time, LMMs only: lFormula + mkLmerDevfun (set-up), then the
# deviance function at the fitted theta, repeated (per evaluation).
evals <- function(k) {
  if (P$family != "gaussian") return(out(ok = FALSE, error = "evals: LMMs only"))
  f <- as.formula(P$r_formula)
  m <- suppressWarnings(suppressMessages(lmer(f, D, REML = P$REML)))
  th <- getME(m, "theta")
  t0 <- as.numeric(Sys.time())
  lf <- lFormula(f, D, REML = P$REML)
  dv <- do.call(mkLmerDevfun, lf)
  t_setup <- as.numeric(Sys.time()) - t0
  dv(th)
  t0 <- as.numeric(Sys.time())
  for (i in seq_len(k)) dv(th * (1 + 1e-6 * i))
  per <- (as.numeric(Sys.time()) - t0) / k
  out(ok = TRUE, setup = t_setup, per_eval = per, nfev = m@optinfo$feval, n_timed = k)
}

con <- file("stdin")
open(con)
out(ok = TRUE, hello = "lme4", version = as.character(packageVersion("lme4")),
    matrix = as.character(packageVersion("Matrix")), r = R.version.string,
    blas = extSoftVersion()[["BLAS"]], pid = Sys.getpid())
repeat {
  line <- readLines(con, n = 1)
  if (length(line) == 0) break
  parts <- strsplit(line, "\t", fixed = TRUE)[[1]]
  op <- parts[1]
  kv <- if (length(parts) > 1) parts[-1] else character()
  if (length(kv) %% 2 == 1) kv <- c(kv, "")  # strsplit drops a trailing empty value
  args <- if (length(kv)) setNames(as.list(kv[c(FALSE, TRUE)]), kv[c(TRUE, FALSE)]) else list()
  if (op == "quit") break
  res <- tryCatch({
    if (op == "load") {
      t0 <- as.numeric(Sys.time())
      D <- if (args$source == "generated") read_generated(args$path) else read_bundled(args$path)
      D <- prep(D, args$prep)
      P <- list(id = args$id, r_formula = args$r_formula, family = args$family,
                nAGQ = as.integer(args$nAGQ), REML = args$REML == "true",
                weights = if (nzchar(args$weights)) args$weights else NULL, contrasts = NULL)
      if (nzchar(args$contrasts)) {
        cl <- list()
        for (pair in strsplit(args$contrasts, ",", fixed = TRUE)[[1]]) {
          kv2 <- strsplit(pair, "=", fixed = TRUE)[[1]]
          cl[[kv2[1]]] <- contrast_matrix(kv2[2], levels(D[[kv2[1]]]))
        }
        P$contrasts <- cl
      }
      gc()
      out(ok = TRUE, loaded = P$id, rows = nrow(D), load_time = as.numeric(Sys.time()) - t0)
    } else if (op == "fit") {
      fit_once(FALSE)
    } else if (op == "memfit") {
      fit_once(TRUE)
    } else if (op == "evals") {
      evals(as.integer(if (is.null(args$k)) 20 else args$k))
    } else {
      out(ok = FALSE, error = paste("unknown op", op))
    }
  }, error = function(e) out(ok = FALSE, error = conditionMessage(e)))
}
