/* A small C shim over CHOLMOD: the only place in mixedmodels that includes cholmod.h.
 *
 * It holds one symmetric matrix whose sparsity pattern is fixed at creation (lower
 * triangle, CSC, 32-bit indices, values borrowed from the caller so that the blocked
 * update can rewrite them in place), analyses it once, and refactorizes it as often as
 * the caller wants. CHOLMOD's status codes come back as return values; nothing prints.
 * The int (not SuiteSparse_long) interface exists in every CHOLMOD release from 2.x to
 * 5.x, which is what lets one source build against Debian 12 and newer SuiteSparse alike.
 */
#ifndef MM_CHOLMOD_H
#define MM_CHOLMOD_H

#include <stddef.h>

typedef struct mm_chol mm_chol;

/* mode: 0 automatic, 1 simplicial, 2 supernodal. Returns NULL on failure and writes
 * the CHOLMOD status into *status (negative: an error, see cholmod_core.h). */
mm_chol *mm_chol_new(int n, int *colptr, int *rowind, double *x, int mode, int *status);
void mm_chol_free(mm_chol *h);

/* Numeric factorization of the current values. Returns 0, or the column (1-based)
 * where the matrix was found not positive definite, or a negative CHOLMOD status. */
int mm_chol_factorize(mm_chol *h);

/* log det(L) = sum(log(diag(L))), i.e. half the log-determinant of the matrix. */
double mm_chol_logdet(const mm_chol *h);

/* In-place dense solves on an n-by-nrhs column-major block with leading dimension ld,
 * as with the L L' factor (a simplicial L D L' factor is scaled by D^(-1/2) on the way).
 * forward:  b <- L^{-1} P b.   backward: b <- P' (L')^{-1} b.
 * Return 0 or a negative CHOLMOD status. */
int mm_chol_forward(mm_chol *h, int nrhs, double *b, int ld);
int mm_chol_backward(mm_chol *h, int nrhs, double *b, int ld);

/* M^{-1} on M's own pattern, by a selected inversion of the current factor (Takahashi's
 * recurrences on the pattern of L, entry by entry: about the work of one simplicial
 * factorization; _cholmod.pyx inverts a supernodal factor block by block with BLAS).
 * out has the length of M's lower-CSC values and receives M^{-1}'s entry at each of
 * their slots.
 * Returns 0, CHOLMOD_OUT_OF_MEMORY, or CHOLMOD_INVALID where the handle holds no
 * positive definite factor (or its pattern is not an elimination's). */
int mm_chol_selected_inverse(mm_chol *h, double *out);

/* A supernodal factor's arrays, as CHOLMOD holds them (L L'): supernode k has columns
 * super[k] .. super[k+1]-1, row indices rows[pi[k]] .. rows[pi[k+1]-1] (its own columns
 * first), and its values column-major at x + px[k], one column per row list; x has
 * xsize entries. Pointers into the handle, valid until its next call. Returns 0, or
 * CHOLMOD_INVALID where the factor is not a factorized supernodal one. */
int mm_chol_supernodes(const mm_chol *h, int *nsuper, const int **super, const int **pi,
                       const int **px, const int **rows, const double **x, size_t *xsize);

/* The current factor as P M P' = U D U' with U unit lower triangular: CSC column
 * pointers p (n + 1), row indices i (diagonal first in each column), values x (1 on the
 * diagonal) and D (n); pointers into the handle, valid until its next call. For the
 * NumPy twin of the selected inversion. Returns 0 or a status as above. */
int mm_chol_unit_factor(mm_chol *h, const int **p, const int **i, const double **x,
                        const double **d);

/* The fill-reducing permutation (length n), whether the factor is supernodal, and the
 * number of nonzeros in L (for reporting the path a model takes). */
const int *mm_chol_perm(const mm_chol *h);
int mm_chol_is_super(const mm_chol *h);
double mm_chol_lnz(const mm_chol *h);
double mm_chol_flops(const mm_chol *h);   /* floating-point operations of one factorization */
int mm_chol_version(void);

/* CHOLMOD's own OpenMP loops (in the supernodal numeric factorization) run on a thread
 * count fixed when SuiteSparse was built (Debian 12: 4), whatever OMP_NUM_THREADS says.
 * serial != 0 makes every OpenMP region of this process run on one thread (no active
 * parallel levels); serial == 0 restores the levels in force before. Returns 1 where
 * this shim was built with OpenMP, 0 where the call can do nothing. */
int mm_openmp_serial(int serial);

#endif
