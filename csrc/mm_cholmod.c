/* See mm_cholmod.h for the contract. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cholmod.h"
#include "mm_cholmod.h"

struct mm_chol {
    cholmod_common c;
    cholmod_sparse A;       /* a header over the caller's arrays, never freed by CHOLMOD */
    cholmod_factor *L;
    cholmod_dense *X, *Y, *E; /* workspaces kept between solves */
    int n;
};

mm_chol *mm_chol_new(int n, int *colptr, int *rowind, double *x, int mode, int *status)
{
    mm_chol *h = calloc(1, sizeof(mm_chol));
    if (h == NULL) { *status = CHOLMOD_OUT_OF_MEMORY; return NULL; }
    cholmod_start(&h->c);
    h->c.print = 0;           /* errors come back as statuses, not text on stderr */
    h->c.error_handler = NULL;
    /* Keep CHOLMOD's natural form: a supernodal factor is L L', a simplicial one L D L'.
     * Asking for L L' everywhere (final_ll) converts every simplicial refactorization,
     * which cost ten times the factorization itself on small models; the solves below
     * apply D^(-1/2) instead, so callers always see the L L' factor. */
    h->c.final_ll = 0;
    h->c.supernodal = mode == 1 ? CHOLMOD_SIMPLICIAL : (mode == 2 ? CHOLMOD_SUPERNODAL : CHOLMOD_AUTO);
    h->n = n;
    cholmod_sparse *A = &h->A;
    A->nrow = A->ncol = (size_t)n;
    A->nzmax = (size_t)colptr[n];
    A->p = colptr;
    A->i = rowind;
    A->nz = NULL;
    A->x = x;
    A->z = NULL;
    A->stype = -1;            /* lower triangle holds the symmetric matrix */
    A->itype = CHOLMOD_INT;
    A->xtype = CHOLMOD_REAL;
    A->dtype = CHOLMOD_DOUBLE;
    A->sorted = 1;
    A->packed = 1;
    h->L = cholmod_analyze(A, &h->c);
    *status = h->c.status;
    if (h->L == NULL || h->c.status < CHOLMOD_OK) {
        mm_chol_free(h);
        return NULL;
    }
    return h;
}

void mm_chol_free(mm_chol *h)
{
    if (h == NULL) return;
    if (h->L) cholmod_free_factor(&h->L, &h->c);
    if (h->X) cholmod_free_dense(&h->X, &h->c);
    if (h->Y) cholmod_free_dense(&h->Y, &h->c);
    if (h->E) cholmod_free_dense(&h->E, &h->c);
    cholmod_finish(&h->c);
    free(h);
}

int mm_chol_factorize(mm_chol *h)
{
    cholmod_factorize(&h->A, h->L, &h->c);
    if (h->c.status < CHOLMOD_OK) return h->c.status;
    if (h->L->minor < h->L->n) return (int)h->L->minor + 1;
    if (!h->L->is_super && !h->L->is_ll) {
        /* an L D L' factor with a non-positive pivot is not positive definite */
        const double *x = h->L->x;
        const int *p = h->L->p;
        for (size_t j = 0; j < h->L->n; j++)
            if (!(x[p[j]] > 0.0)) return (int)j + 1;
    }
    return 0;
}

double mm_chol_logdet(const mm_chol *h)
{
    const cholmod_factor *L = h->L;
    const double *x = L->x;
    double s = 0.0;
    if (L->is_super) {
        const int *super = L->super, *pi = L->pi, *px = L->px;
        for (size_t k = 0; k < L->nsuper; k++) {
            int ncols = super[k + 1] - super[k];
            int nrows = pi[k + 1] - pi[k];
            const double *blk = x + px[k];
            for (int j = 0; j < ncols; j++) s += log(blk[j + (size_t)j * nrows]);
        }
    } else {
        const int *p = L->p;
        /* simplicial: the diagonal is the first entry of each column; an LDL' factor
         * holds D there, whose log is twice that of an L L' diagonal */
        double scale = L->is_ll ? 1.0 : 0.5;
        for (size_t j = 0; j < L->n; j++) s += scale * log(x[p[j]]);
    }
    return s;
}

static int solve_into(mm_chol *h, int sys, int nrhs, double *b, int ld)
{
    cholmod_dense B;
    memset(&B, 0, sizeof(B));
    B.nrow = (size_t)h->n;
    B.ncol = (size_t)nrhs;
    B.nzmax = (size_t)ld * nrhs;
    B.d = (size_t)ld;
    B.x = b;
    B.xtype = CHOLMOD_REAL;
    B.dtype = CHOLMOD_DOUBLE;
    if (!cholmod_solve2(sys, h->L, &B, NULL, &h->X, NULL, &h->Y, &h->E, &h->c))
        return h->c.status < 0 ? h->c.status : -1;
    const double *xs = h->X->x;
    size_t dx = h->X->d;
    for (int j = 0; j < nrhs; j++)
        memcpy(b + (size_t)j * ld, xs + (size_t)j * dx, sizeof(double) * (size_t)h->n);
    return 0;
}

/* Rows of b times D^(-1/2) for a simplicial L D L' factor (a no-op for L L'), so that
 * forward/backward act as the L L' factor would. */
static void scale_by_d(mm_chol *h, int nrhs, double *b, int ld)
{
    const cholmod_factor *L = h->L;
    if (L->is_super || L->is_ll) return;
    const double *x = L->x;
    const int *p = L->p;
    for (size_t j = 0; j < L->n; j++) {
        double f = 1.0 / sqrt(x[p[j]]);
        for (int c = 0; c < nrhs; c++) b[j + (size_t)c * ld] *= f;
    }
}

int mm_chol_forward(mm_chol *h, int nrhs, double *b, int ld)
{
    int s = solve_into(h, CHOLMOD_P, nrhs, b, ld);
    if (!s) s = solve_into(h, CHOLMOD_L, nrhs, b, ld);
    if (!s) scale_by_d(h, nrhs, b, ld);
    return s;
}

int mm_chol_backward(mm_chol *h, int nrhs, double *b, int ld)
{
    scale_by_d(h, nrhs, b, ld);
    int s = solve_into(h, CHOLMOD_Lt, nrhs, b, ld);
    return s ? s : solve_into(h, CHOLMOD_Pt, nrhs, b, ld);
}

const int *mm_chol_perm(const mm_chol *h) { return h->L->Perm; }
int mm_chol_is_super(const mm_chol *h) { return h->L->is_super; }
double mm_chol_lnz(const mm_chol *h) { return h->c.lnz; }
double mm_chol_flops(const mm_chol *h) { return h->c.fl; }
int mm_chol_version(void) { return CHOLMOD_VERSION; }

#ifdef _OPENMP
#include <omp.h>
static int mm_saved_levels = -1;
#endif

int mm_openmp_serial(int serial)
{
#ifdef _OPENMP
    if (serial) {
        if (mm_saved_levels < 0) mm_saved_levels = omp_get_max_active_levels();
        omp_set_max_active_levels(0);
    } else if (mm_saved_levels >= 0) {
        omp_set_max_active_levels(mm_saved_levels);
        mm_saved_levels = -1;
    }
    return 1;
#else
    (void) serial;
    return 0;
#endif
}
