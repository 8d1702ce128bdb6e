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
    /* the selected inversion (mm_chol_selected_inverse), allocated on first use */
    size_t unnz;              /* entries of the unit factor below (diagonal included) */
    int *up, *ui;             /* P M P' = U D U': U unit lower, CSC, diagonal first */
    double *ux, *ud;          /* U's values (1 on the diagonal) and D */
    double *zx;               /* (P M P')^{-1} on U's pattern */
    int *mark;                /* row -> its slot in the column being inverted, or -1 */
    int *gstart, *gslot, *grow; /* M's slots grouped by the column of U that holds them */
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
    free(h->up); free(h->ui); free(h->ux); free(h->ud); free(h->zx); free(h->mark);
    free(h->gstart); free(h->gslot); free(h->grow);
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

/* -- selected inversion ------------------------------------------------------------ */

/* Entries of the factor, diagonal included, as stored column by column. */
static size_t factor_entries(const cholmod_factor *L)
{
    size_t total = 0;
    if (L->is_super) {
        const int *super = L->super, *pi = L->pi;
        for (size_t k = 0; k < L->nsuper; k++) {
            size_t ncols = (size_t)(super[k + 1] - super[k]);
            size_t nrows = (size_t)(pi[k + 1] - pi[k]);
            total += ncols * nrows - ncols * (ncols - 1) / 2;   /* the lower trapezoid */
        }
    } else {
        const int *nz = L->nz;
        for (size_t j = 0; j < L->n; j++) total += (size_t)nz[j];
    }
    return total;
}

/* (Re)allocate the arrays of the unit factor for unnz entries; 0 or a negative status. */
static int unit_arrays(mm_chol *h, size_t unnz)
{
    if (h->up != NULL && h->unnz == unnz) return 0;
    free(h->ui); free(h->ux); free(h->zx);
    h->ui = malloc(unnz * sizeof(int));
    h->ux = malloc(unnz * sizeof(double));
    h->zx = malloc(unnz * sizeof(double));
    if (h->up == NULL) {
        h->up = malloc(((size_t)h->n + 1) * sizeof(int));
        h->ud = malloc((size_t)h->n * sizeof(double));
        h->mark = malloc((size_t)h->n * sizeof(int));
        if (h->mark) for (int j = 0; j < h->n; j++) h->mark[j] = -1;
    }
    h->unnz = unnz;
    if (!h->ui || !h->ux || !h->zx || !h->up || !h->ud || !h->mark) {
        free(h->ui); free(h->ux); free(h->zx);
        h->ui = NULL; h->ux = h->zx = NULL;
        h->unnz = 0;
        return CHOLMOD_OUT_OF_MEMORY;
    }
    return 0;
}

/* Copy the current numeric factor as P M P' = U D U' with U unit lower triangular in
 * packed CSC, whatever CHOLMOD's form: a simplicial L D L' is that already (D sits on
 * L's diagonal), an L L' factor (simplicial or supernodal) is U = L diag(L)^{-1},
 * D = diag(L)^2. Returns 0, or CHOLMOD_INVALID where the factor is not numeric and
 * positive definite. */
static int unit_factor(mm_chol *h)
{
    const cholmod_factor *L = h->L;
    if (L->xtype != CHOLMOD_REAL || L->minor < L->n) return CHOLMOD_INVALID;
    int s = unit_arrays(h, factor_entries(L));
    if (s) return s;
    int *up = h->up, *ui = h->ui;
    double *ux = h->ux, *ud = h->ud;
    const double *x = L->x;
    size_t t = 0;
    up[0] = 0;
    if (L->is_super) {
        const int *super = L->super, *pi = L->pi, *px = L->px, *ls = L->s;
        for (size_t k = 0; k < L->nsuper; k++) {
            int ncols = super[k + 1] - super[k];
            int nrows = pi[k + 1] - pi[k];
            const int *rows = ls + pi[k];
            for (int jj = 0; jj < ncols; jj++) {
                const double *col = x + px[k] + (size_t)jj * nrows;
                int j = super[k] + jj;
                double diag = col[jj];
                if (!(diag > 0.0) || rows[jj] != j) return CHOLMOD_INVALID;
                ud[j] = diag * diag;
                for (int r = jj; r < nrows; r++, t++) {
                    ui[t] = rows[r];
                    ux[t] = r == jj ? 1.0 : col[r] / diag;
                }
                up[j + 1] = (int)t;
            }
        }
    } else {
        const int *lp = L->p, *li = L->i, *nz = L->nz;
        for (int j = 0; j < h->n; j++) {
            int p0 = lp[j];
            if (nz[j] < 1) return CHOLMOD_INVALID;
            double diag = x[p0];
            if (!(diag > 0.0) || li[p0] != j) return CHOLMOD_INVALID;
            double scale = L->is_ll ? 1.0 / diag : 1.0;
            ud[j] = L->is_ll ? diag * diag : diag;
            for (int q = 0; q < nz[j]; q++, t++) {
                ui[t] = li[p0 + q];
                ux[t] = q == 0 ? 1.0 : x[p0 + q] * scale;
            }
            up[j + 1] = (int)t;
        }
    }
    return 0;
}

/* Group M's slots (lower CSC, original order) by the column of U that holds their entry:
 * slot (i, j) sits at row max(Pinv i, Pinv j) of column min(Pinv i, Pinv j). Made once:
 * M's pattern and the permutation are fixed when the handle is made. */
static int group_slots(mm_chol *h)
{
    if (h->gstart != NULL) return 0;
    int n = h->n;
    const int *ap = h->A.p, *ai = h->A.i, *perm = h->L->Perm;
    size_t nnz = (size_t)ap[n];
    int *pinv = malloc((size_t)n * sizeof(int));
    int *fill = malloc((size_t)n * sizeof(int));
    int *gstart = calloc((size_t)n + 1, sizeof(int));
    int *gslot = malloc((nnz ? nnz : 1) * sizeof(int));
    int *grow = malloc((nnz ? nnz : 1) * sizeof(int));
    if (!pinv || !fill || !gstart || !gslot || !grow) {
        free(pinv); free(fill); free(gstart); free(gslot); free(grow);
        return CHOLMOD_OUT_OF_MEMORY;
    }
    for (int k = 0; k < n; k++) pinv[perm ? perm[k] : k] = k;
    for (int j = 0; j < n; j++)             /* count per column of U, then place */
        for (int q = ap[j]; q < ap[j + 1]; q++) {
            int a = pinv[ai[q]], b = pinv[j];
            gstart[(a < b ? a : b) + 1]++;
        }
    for (int j = 0; j < n; j++) gstart[j + 1] += gstart[j];
    memcpy(fill, gstart, (size_t)n * sizeof(int));
    for (int j = 0; j < n; j++)
        for (int q = ap[j]; q < ap[j + 1]; q++) {
            int a = pinv[ai[q]], b = pinv[j];
            int col = a < b ? a : b;
            gslot[fill[col]] = q;
            grow[fill[col]++] = a < b ? b : a;
        }
    free(fill);
    free(pinv);
    h->gstart = gstart;
    h->gslot = gslot;
    h->grow = grow;
    return 0;
}

/* Takahashi's recurrences on U's pattern, right to left: with Z = (U D U')^{-1},
 *     Z_ij = -sum_{k in S_j} Z_ik U_kj  (i in S_j),   Z_jj = 1/D_j - sum_{k in S_j} U_kj Z_kj,
 * S_j the rows below the diagonal of column j. Every Z_ik with i, k in S_j lies on the
 * pattern (the elimination's fill makes S_j a clique), in column min(i, k): walking
 * column k of Z meets each pair {i, k} of S_j once, which is counted as a check. M's
 * slots held by column j are read off while its rows are marked. */
int mm_chol_selected_inverse(mm_chol *h, double *out)
{
    int s = unit_factor(h);
    if (!s) s = group_slots(h);
    if (s) return s;
    const int *up = h->up, *ui = h->ui, *gstart = h->gstart, *gslot = h->gslot, *grow = h->grow;
    const double *ux = h->ux, *ud = h->ud;
    double *zx = h->zx;
    int *mark = h->mark;
    for (int j = h->n - 1; j >= 0; j--) {
        int p0 = up[j], p1 = up[j + 1];
        for (int t = p0 + 1; t < p1; t++) {
            mark[ui[t]] = t;
            zx[t] = 0.0;
        }
        long long pairs = 0, below = p1 - p0 - 1;
        for (int t = p0 + 1; t < p1; t++) {
            int k = ui[t];
            double ukj = ux[t];
            zx[t] -= zx[up[k]] * ukj;               /* Z_kk U_kj */
            for (int tt = up[k] + 1; tt < up[k + 1]; tt++) {
                int m = mark[ui[tt]];
                if (m < 0) continue;
                pairs++;
                zx[m] -= zx[tt] * ukj;              /* Z_ik U_kj, i > k */
                zx[t] -= zx[tt] * ux[m];            /* Z_ki U_ij */
            }
        }
        double d = 1.0 / ud[j];
        for (int t = p0 + 1; t < p1; t++) d -= ux[t] * zx[t];
        zx[p0] = d;
        int missing = pairs != below * (below - 1) / 2;
        for (int g = gstart[j]; g < gstart[j + 1]; g++) {
            int row = grow[g];
            if (row == j) out[gslot[g]] = d;
            else if (mark[row] >= 0) out[gslot[g]] = zx[mark[row]];
            else missing = 1;
        }
        for (int t = p0 + 1; t < p1; t++) mark[ui[t]] = -1;
        if (missing) return CHOLMOD_INVALID;
    }
    return 0;
}

int mm_chol_supernodes(const mm_chol *h, int *nsuper, const int **super, const int **pi,
                       const int **px, const int **rows, const double **x, size_t *xsize)
{
    const cholmod_factor *L = h->L;
    if (!L->is_super || L->xtype != CHOLMOD_REAL || L->minor < L->n) return CHOLMOD_INVALID;
    *nsuper = (int)L->nsuper;
    *super = L->super;
    *pi = L->pi;
    *px = L->px;
    *rows = L->s;
    *x = L->x;
    *xsize = L->xsize;
    return 0;
}

int mm_chol_unit_factor(mm_chol *h, const int **p, const int **i, const double **x,
                        const double **d)
{
    int s = unit_factor(h);
    if (s) return s;
    *p = h->up;
    *i = h->ui;
    *x = h->ux;
    *d = h->ud;
    return 0;
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
