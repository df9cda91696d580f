// Per-element math of the cosine edge matrices and their MSE loss, shared by CPU and CUDA.
//
// Graph g holds rows a..b of X (n = b - a nodes). With G = X X^T, r_i = max(sqrt(G_ii), eps)
// and E = R^-1 G R^-1 (torch.nn.functional.normalize semantics, eps included), a loss L whose
// gradient wrt E is symmetric S has input gradient dX = M X with
//     s_i  = sum_j S_ij E_ij          for rows with sqrt(G_ii) >= eps ("live" rows), else 0
//     M_ij = (S_ij - [i == j] s_i) / (r_i r_j).
// For the edge loss  L = sum_g 1/2 mean((E_t - E_s)^2):  S_s = 2 (E_s - E_t) / n^2, S_t = -S_s.
#pragma once

#include <cmath>
#include <cstdint>

#include "roi_align_common.h"  // DSIG_HD

namespace dsig {
namespace detail {

DSIG_HD float sqrt_of(float v) { return sqrtf(v); }
DSIG_HD double sqrt_of(double v) { return ::sqrt(v); }

// ||x_i|| from the Gram diagonal.
template <typename acc_t>
DSIG_HD acc_t row_norm(acc_t gram_ii) {
  return sqrt_of(gram_ii > acc_t(0) ? gram_ii : acc_t(0));
}

// Denominator of normalize: max(||x_i||, eps).
template <typename acc_t>
DSIG_HD acc_t clamped_norm(acc_t norm, acc_t eps) {
  return norm > eps ? norm : eps;
}

// A row is "live" where normalize's clamp passes gradient (clamp_min backward: norm >= eps).
template <typename acc_t>
DSIG_HD bool live_row(acc_t norm, acc_t eps) {
  return norm >= eps;
}

template <typename acc_t>
DSIG_HD acc_t edge_entry(acc_t gram_ij, acc_t r_i, acc_t r_j) {
  return gram_ij / (r_i * r_j);
}

// Contribution of entry (i, j) of a graph of n nodes to 1/2 mean((E_t - E_s)^2).
template <typename acc_t>
DSIG_HD acc_t edge_loss_entry(acc_t e_s, acc_t e_t, int64_t n) {
  const acc_t d = e_t - e_s;
  return d * d / (acc_t(2) * static_cast<acc_t>(n) * static_cast<acc_t>(n));
}

// dL/dE_s at (i, j) of the same loss (the teacher side is its negative).
template <typename acc_t>
DSIG_HD acc_t edge_loss_student_grad(acc_t e_s, acc_t e_t, int64_t n) {
  return acc_t(2) * (e_s - e_t) / (static_cast<acc_t>(n) * static_cast<acc_t>(n));
}

// M_ij from the symmetric gradient S_ij; rows that are not live get no projection term,
// or no gradient at all when zero_dead_rows is set.
template <typename acc_t>
DSIG_HD acc_t factor_entry(acc_t s_ij, acc_t rowdot_i, acc_t r_i, acc_t r_j, bool diagonal,
                           bool live_i, bool zero_dead_rows) {
  if (!live_i && zero_dead_rows) return acc_t(0);
  return (s_ij - (diagonal ? rowdot_i : acc_t(0))) / (r_i * r_j);
}

}  // namespace detail
}  // namespace dsig
