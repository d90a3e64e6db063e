# Writes tests/data/proc_expected.json: seeded cases (data written out in full, so Python reads the
# very same numbers) with what R pROC and the Hosmer-Lemeshow formula of ResourceSelection give.
#
# Usage: Rscript tests/reference/make_proc_expected.R [OUTPUT.json]
# Needs R >= 4 and pROC (Debian: apt-get install r-base-core r-cran-proc). ResourceSelection is not
# packaged in Debian, so hoslem.test(g = 10) is written out below line for line.

suppressMessages(library(pROC))

args <- commandArgs(trailingOnly = TRUE)
out <- if (length(args) >= 1) args[1] else "tests/data/proc_expected.json"

# ---- minimal JSON writer (no jsonlite needed); 17 significant digits round-trip a double ----
num <- function(x) {
  ifelse(is.na(x), "NaN",
    ifelse(is.infinite(x), ifelse(x > 0, "Infinity", "-Infinity"), sprintf("%.17g", x)))
}
vec <- function(x) paste0("[", paste(num(x), collapse = ", "), "]")
obj <- function(fields) {
  paste0("{", paste(sprintf("\"%s\": %s", names(fields), unlist(fields)), collapse = ", "), "}")
}

# ---- ResourceSelection::hoslem.test, same steps ----
hoslem <- function(y, yhat, g = 10) {
  qq <- unique(quantile(yhat, probs = seq(0, 1, 1 / g)))
  cutyhat <- cut(yhat, breaks = qq, include.lowest = TRUE)
  observed <- xtabs(cbind(y0 = 1 - y, y1 = y) ~ cutyhat)
  expected <- xtabs(cbind(yhat0 = 1 - yhat, yhat1 = yhat) ~ cutyhat)
  chisq <- sum((observed - expected)^2 / expected)
  list(statistic = chisq, df = g - 2, p_value = 1 - pchisq(chisq, g - 2))
}

# ---- one ROC case: labels in shuffled order, two paired scores ----
roc_case <- function(name, y, a, b) {
  ra <- roc(response = y, predictor = a, levels = c(0, 1), direction = "<", quiet = TRUE)
  rb <- roc(response = y, predictor = b, levels = c(0, 1), direction = "<", quiet = TRUE)
  ci_a <- suppressWarnings(as.numeric(ci.auc(ra, method = "delong")))
  ci_b <- suppressWarnings(as.numeric(ci.auc(rb, method = "delong")))
  test <- suppressWarnings(roc.test(ra, rb, method = "delong", paired = TRUE))
  best <- coords(ra, "best", best.method = "youden",
                 ret = c("threshold", "sensitivity", "specificity"), transpose = FALSE)
  obj(list(
    name = sprintf("\"%s\"", name),
    y = vec(y), score_a = vec(a), score_b = vec(b),
    auc_a = num(as.numeric(ra$auc)), ci_a = vec(ci_a[c(1, 3)]),
    auc_b = num(as.numeric(rb$auc)), ci_b = vec(ci_b[c(1, 3)]),
    test_z = num(unname(test$statistic)), test_p = num(test$p.value),
    # pROC lists every tied optimum in ascending threshold order; Python returns the first.
    youden_thresholds = vec(best$threshold),
    youden_sensitivity = num(best$sensitivity[1]),
    youden_specificity = num(best$specificity[1])
  ))
}

labels <- function(n_pos, n_neg) sample(rep(c(1, 0), c(n_pos, n_neg)))

cases <- character(0)

set.seed(101)  # many ties: one decimal
y <- labels(30, 30)
cases <- c(cases, roc_case("ties", y,
  round(rnorm(60) + 0.8 * y, 1), round(rnorm(60) + 0.4 * y, 1)))

set.seed(102)  # 10 positives / 90 negatives, correlated scores
y <- labels(10, 90)
a <- round(rnorm(100) + 1.2 * y, 3)
cases <- c(cases, roc_case("imbalanced", y, a, round(0.5 * a + 0.8 * rnorm(100), 3)))

set.seed(103)  # AUC < 0.5 with direction "<" kept
y <- labels(40, 40)
cases <- c(cases, roc_case("auc_below_half", y,
  round(rnorm(80) - 0.7 * y, 3), round(rnorm(80) + 0.5 * y, 3)))

set.seed(104)  # perfect separation for score a
y <- labels(15, 15)
cases <- c(cases, roc_case("perfect", y,
  round(ifelse(y == 1, runif(30, 0.55, 1), runif(30, 0, 0.45)), 3),
  round(runif(30) + 0.2 * y, 3)))

set.seed(105)  # n = 10
y <- labels(5, 5)
cases <- c(cases, roc_case("n10", y, round(rnorm(10) + y, 2), round(rnorm(10) + 0.5 * y, 2)))

set.seed(106)  # paper-sized cohort, n = 352
y <- labels(158, 194)
a <- round(rnorm(352) + y, 4)
cases <- c(cases, roc_case("medium", y, a, round(0.6 * a + 0.8 * rnorm(352) + 0.3 * y, 4)))

set.seed(107)  # identical scores: pROC's 0/0 rule gives z = 0
y <- labels(12, 13)
a <- round(rnorm(25) + y, 2)
cases <- c(cases, roc_case("identical", y, a, a))

hl_case <- function(name, y, p) {
  hl <- hoslem(y, p, g = 10)
  obj(list(name = sprintf("\"%s\"", name), y = vec(y), prob = vec(p), groups = "10",
           statistic = num(hl$statistic), df = num(hl$df), p_value = num(hl$p_value)))
}
set.seed(108)
p <- round(plogis(rnorm(200, -0.3, 1.2)), 4)
hl <- c(hl_case("calibrated", rbinom(200, 1, p), p))
set.seed(109)  # probabilities on a coarse grid: fewer than 11 unique quantile breaks
p <- round(plogis(rnorm(150, 0, 1)), 1)
hl <- c(hl, hl_case("coarse", rbinom(150, 1, pmin(1, p * 1.2)), p))

meta <- obj(list(
  r_version = sprintf("\"%s\"", R.version.string),
  proc_version = sprintf("\"%s\"", as.character(packageVersion("pROC")))
))
writeLines(c(
  "{",
  paste0("\"meta\": ", meta, ","),
  paste0("\"roc_cases\": [\n", paste(cases, collapse = ",\n"), "\n],"),
  paste0("\"hosmer_lemeshow\": [\n", paste(hl, collapse = ",\n"), "\n]"),
  "}"
), out)
