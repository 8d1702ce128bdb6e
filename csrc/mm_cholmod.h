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
