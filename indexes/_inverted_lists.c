/*
 * Inverted lists of keys and their top-k inner-product scan, for indexes/inverted_lists.py (loaded
 * with ctypes; plain C, no Python API).
 *
 * A store holds `nlist` lists. List l holds its keys as raw codes, `dim` elements of float32,
 * bfloat16 or float16 each (the memory's own dtype: a key decodes to exactly the value it had), and
 * their int32 ids, in the order they were added, in blocks of 16 keys. A list is a few segments of
 * whole blocks: a build reserves each list's exact size as one segment, and a full list gets a new
 * segment of an eighth of its room (at least one block). Segments are cut in turn from large mapped
 * slabs of the store and never move: a list grows without a copy and without leaving a freed hole
 * behind (lists that realloc'ed as they grew kept RSS ~15% above their bytes), and a slab's pages are
 * resident only once keys are written to them.
 *
 * knn_scan() takes, for each query, its lists in the order to scan them and, for each place, the
 * largest upper bound of q.k over the lists not yet scanned there (the caller computes both;
 * knn_search() ranks the lists itself, by their bound or by another key, from every list's, and
 * knn_search_boxes() computes those from the lists' boxes first), and scans
 * them in that order, keeping the k largest q.k. The first `nprobe` lists are scanned whatever they
 * hold; then the scan stops as soon as that bound is below the k-th score: no key left can enter the
 * top-k, so the result is exact. A query scans at most `cap` lists.
 *
 * knn_assign() finds the nearest centroid of each new key (the list it goes to), knn_gather() copies
 * rows of chunked storage by id (the retrieved values of the memory, knn_memory/storage.py) and
 * knn_weighted_gather() sums them weighted (attention over the retrieved values, without copying them),
 * knn_topk_rows() selects the k largest of each row of a score matrix (the exact search, indexes/select.py).
 * knn_add_heads() and knn_search_heads() do the add (assignment included) and the search of every head
 * of a batch row in one call (indexes/batched.py).
 *
 * knn_search_boxes() and knn_search_heads() also compute the bounds: one tiled product of the query
 * rows with the boxes (dot_rows()), so the ranking runs on the threads the heads are split over.
 *
 * The dot products use AVX-512 (F, BW, VL) or AVX2 + FMA + F16C when the CPU has them, chosen at
 * run time; plain C otherwise. Every path sums in float32. The caller validates every argument.
 */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS under -std=c11 */
#include <float.h>
#include <math.h>
#if defined(__GLIBC__) || defined(__linux__)
#include <malloc.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define KNN_MMAP 1
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define KNN_X86 1
#include <immintrin.h>
#endif

#define KNN_VERSION 14
#define KNN_LANES 16 /* keys per block */

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2 };
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

/* A segment: whole blocks of one list in one piece of memory (the scan kernels take one at a time):
 * cap / KNN_LANES blocks of codes (see the header; uint16_t or float elements), then cap int32 ids. */
typedef struct {
    uint8_t *codes;
    int32_t size, cap; /* keys held, keys of room (a multiple of KNN_LANES) */
} knn_seg;

/* A list: its segments in insertion order; those before `cur` are full, those after it empty. */
typedef struct {
    int64_t size, cap;  /* keys held, keys of room, over all segments */
    int64_t nseg, room; /* segments, and entries allocated in `segs` */
    int64_t cur;        /* the segment the next key goes to */
    knn_seg *segs;
} knn_list;

typedef struct {
    void *base;
    size_t bytes;
} knn_slab;

typedef struct {
    int64_t nlist, dim, kind;
    int64_t width;       /* elements of one key side by side in a lane: 2 for bfloat16, else 1 */
    int64_t rows;        /* rows of a block: ceil(dim / width) */
    int64_t block_bytes; /* KNN_LANES * rows * width * element size */
    knn_list *lists;
    knn_slab *slabs; /* where segments are cut from, in turn (freed with the store) */
    int64_t nslab, slab_room;
    size_t mapped;   /* bytes of all slabs */
    uint8_t *next;   /* the unused end of the newest slab, and its length */
    size_t left;
} knn_store;

/* ------------------------------------------------------------------ instruction set */
static int detected_isa(void) {
#ifdef KNN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

static int active_isa = -1;

int knn_version(void) { return KNN_VERSION; }

int knn_best_isa(void) { return detected_isa(); }

int knn_isa(void) {
    if (active_isa < 0) active_isa = detected_isa();
    return active_isa;
}

/* Use `level` (0 scalar, 1 AVX2, 2 AVX-512), capped at what the CPU has; returns the level in use. */
int knn_set_isa(int level) {
    int best = detected_isa();
    active_isa = level < 0 ? 0 : (level > best ? best : level);
    return active_isa;
}

/* ------------------------------------------------------------------ the store */
static int64_t elem_size(int64_t kind) { return kind == KIND_F32 ? 4 : 2; }

/* Offset, in elements, of element i of the key in lane `lane` of a block. */
static inline int64_t slot(const knn_store *s, int64_t lane, int64_t i) {
    return ((i / s->width) * KNN_LANES + lane) * s->width + i % s->width;
}

/* The ids of a segment, after its codes. */
static inline int32_t *seg_ids(const knn_store *s, const knn_seg *g) {
    return (int32_t *)(g->codes + (int64_t)g->cap / KNN_LANES * s->block_bytes);
}

void *knn_store_new(int64_t nlist, int64_t dim, int64_t kind) {
    knn_store *s = (knn_store *)calloc(1, sizeof(knn_store));
    if (!s) return NULL;
    s->lists = (knn_list *)calloc((size_t)nlist, sizeof(knn_list));
    if (!s->lists) {
        free(s);
        return NULL;
    }
    s->nlist = nlist;
    s->dim = dim;
    s->kind = kind;
    s->width = kind == KIND_BF16 ? 2 : 1;
    s->rows = (dim + s->width - 1) / s->width;
    s->block_bytes = KNN_LANES * s->rows * s->width * elem_size(kind);
    return s;
}

#define KNN_SLAB_MIN ((size_t)1 << 20)  /* bytes of the smallest slab */
#define KNN_HUGE_PAGE ((size_t)2 << 20) /* slabs of at least this are whole huge pages */

/* A slab of `bytes` (a multiple of the page size; of KNN_HUGE_PAGE from KNN_HUGE_PAGE on). A large slab
 * asks for transparent huge pages: the scan visits a few KiB of each of thousands of lists and the adds
 * write to all of their ends, so with 4 KiB pages most of those visits miss the TLB (adds of 2M keys to
 * 1448 lists took half the time with them; a scan gained less than run-to-run noise). Slabs are filled
 * from their start on, so at most one huge page past the last segment is resident and unused. */
static void *slab_map(size_t bytes) {
#ifdef KNN_MMAP
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    if (bytes >= KNN_HUGE_PAGE) (void)madvise(p, bytes, MADV_HUGEPAGE); /* a hint: refused, small pages */
#endif
    return p;
#else
    return calloc(1, bytes);
#endif
}

static void slab_unmap(void *p, size_t bytes) {
#ifdef KNN_MMAP
    munmap(p, bytes);
#else
    (void)bytes;
    free(p);
#endif
}

void knn_store_free(void *h) {
    knn_store *s = (knn_store *)h;
    if (!s) return;
    for (int64_t l = 0; l < s->nlist; l++) free(s->lists[l].segs);
    for (int64_t i = 0; i < s->nslab; i++) slab_unmap(s->slabs[i].base, s->slabs[i].bytes);
    free(s->slabs);
    free(s->lists);
    free(s);
#ifdef __GLIBC__
    /* the segment tables of every list were small blocks all over the heap: give their pages back */
    malloc_trim(0);
#endif
}

/* Double the entries allocated in a table (`first` for the first): *room, and *table moved if needed. */
static int table_grow(void **table, int64_t *room, int64_t first, size_t entry) {
    const int64_t more = *room ? 2 * *room : first;
    void *p = realloc(*table, (size_t)more * entry);
    if (!p) return -1;
    *table = p;
    *room = more;
    return 0;
}

/* Make the newest slab's unused end at least `bytes` long: a new slab of at least that, of an eighth of
 * what the store has mapped so far, and of KNN_SLAB_MIN (its untouched pages cost no memory). */
static int slab_ensure(knn_store *s, size_t bytes) {
    if (bytes <= s->left) return 0;
    if (s->nslab == s->slab_room && table_grow((void **)&s->slabs, &s->slab_room, 8, sizeof(knn_slab))) return -1;
    size_t size = bytes > KNN_SLAB_MIN ? bytes : KNN_SLAB_MIN;
    if (size < s->mapped / 8) size = s->mapped / 8;
    const size_t unit = size >= KNN_HUGE_PAGE ? KNN_HUGE_PAGE : 4096; /* whole huge pages: recent kernels
                                                                         align such a mapping to them */
    size = (size + unit - 1) / unit * unit;
    uint8_t *p = (uint8_t *)slab_map(size);
    if (!p) return -1;
    s->slabs[s->nslab].base = p;
    s->slabs[s->nslab].bytes = size;
    s->nslab++;
    s->mapped += size;
    s->next = p;
    s->left = size;
    return 0;
}

static size_t seg_bytes(const knn_store *s, int64_t keys) {
    return (size_t)(keys / KNN_LANES * s->block_bytes + keys * (int64_t)sizeof(int32_t));
}

/* A new segment of room for `keys` more keys (rounded up to whole blocks) at the end of list li, cut
 * from the newest slab (zero: the scan reads padding elements and lanes past the last key). */
static int add_segment(knn_store *s, knn_list *li, int64_t keys) {
    keys = (keys + KNN_LANES - 1) / KNN_LANES * KNN_LANES;
    if (li->nseg == li->room && table_grow((void **)&li->segs, &li->room, 4, sizeof(knn_seg))) return -1;
    const size_t bytes = seg_bytes(s, keys); /* a multiple of 32: every segment stays 32-byte aligned */
    if (slab_ensure(s, bytes)) return -1;
    knn_seg *seg = &li->segs[li->nseg++];
    seg->size = 0;
    seg->cap = (int32_t)keys;
    seg->codes = s->next;
    s->next += bytes;
    s->left -= bytes;
    li->cap += keys;
    return 0;
}

/* Room for `extra[l]` more keys in every list l, as one segment each, side by side in one slab (a
 * build knows its sizes: no room left unused but the last block's). */
int knn_store_reserve(void *h, const int64_t *extra) {
    knn_store *s = (knn_store *)h;
    size_t total = 0;
    for (int64_t l = 0; l < s->nlist; l++) {
        const knn_list *li = &s->lists[l];
        const int64_t more = li->size + extra[l] - li->cap;
        if (more > 0) total += seg_bytes(s, (more + KNN_LANES - 1) / KNN_LANES * KNN_LANES);
    }
    if (slab_ensure(s, total)) return -1;
    for (int64_t l = 0; l < s->nlist; l++) {
        knn_list *li = &s->lists[l];
        const int64_t more = li->size + extra[l] - li->cap;
        if (more > 0 && add_segment(s, li, more)) return -1;
    }
    return 0;
}

/* Append n keys: codes [n, dim] (row-major elements of the store's kind), their lists [n] and ids [n].
 * 0, or -1 out of memory. */
int knn_store_add(void *h, int64_t n, const void *codes, const int64_t *lists, const int64_t *ids) {
    knn_store *s = (knn_store *)h;
    for (int64_t r = 0; r < n; r++) {
        knn_list *li = &s->lists[lists[r]];
        if (li->size == li->cap && add_segment(s, li, li->cap / 8 > KNN_LANES ? li->cap / 8 : KNN_LANES))
            return -1;
        while (li->segs[li->cur].size == li->segs[li->cur].cap) li->cur++;
        knn_seg *seg = &li->segs[li->cur];
        int64_t block = seg->size / KNN_LANES, lane = seg->size % KNN_LANES;
        uint8_t *dst = seg->codes + block * s->block_bytes;
        /* element i goes to slot(s, lane, i): row i / width, lane, half i % width of the lane's 32 bits
         * (bfloat16) or the lane itself; written row by row, without a division per element */
        if (s->kind == KIND_F32) {
            const float *src = (const float *)codes + r * s->dim;
            float *d32 = (float *)dst + lane;
            for (int64_t i = 0; i < s->dim; i++) d32[i * KNN_LANES] = src[i];
        } else if (s->kind == KIND_BF16) {
            const uint16_t *src = (const uint16_t *)codes + r * s->dim;
            uint16_t *d16 = (uint16_t *)dst + 2 * lane;
            int64_t i = 0;
            for (; i + 2 <= s->dim; i += 2) {
                uint32_t pair; /* both halves at once (src may be 2-byte aligned only) */
                memcpy(&pair, src + i, sizeof pair);
                memcpy(d16 + i * KNN_LANES, &pair, sizeof pair);
            }
            if (i < s->dim) d16[i * KNN_LANES] = src[i]; /* odd dim: the last row's high half stays 0 */
        } else {
            const uint16_t *src = (const uint16_t *)codes + r * s->dim;
            uint16_t *d16 = (uint16_t *)dst + lane;
            for (int64_t i = 0; i < s->dim; i++) d16[i * KNN_LANES] = src[i];
        }
        seg_ids(s, seg)[seg->size] = (int32_t)ids[r];
        seg->size++;
        li->size++;
    }
    return 0;
}

/* knn_store_add, and the lists' boxes: bounds [nlist, 2 dim] float32 (per-channel maxima, then minima)
 * widened to hold keys [n, dim] float32, and counts [nlist] int64 incremented. */
int knn_store_add_boxed(void *h, int64_t n, const void *codes, const int64_t *lists, const int64_t *ids,
                        const float *keys, float *bounds, int64_t *counts) {
    knn_store *s = (knn_store *)h;
    if (knn_store_add(h, n, codes, lists, ids)) return -1;
    const int64_t d = s->dim;
    for (int64_t r = 0; r < n; r++) {
        float *hi = bounds + lists[r] * 2 * d, *lo = hi + d;
        const float *x = keys + r * d;
        for (int64_t i = 0; i < d; i++) {
            hi[i] = x[i] > hi[i] ? x[i] : hi[i];
            lo[i] = x[i] < lo[i] ? x[i] : lo[i];
        }
        counts[lists[r]]++;
    }
    return 0;
}

void knn_store_sizes(void *h, int64_t *out) {
    knn_store *s = (knn_store *)h;
    for (int64_t l = 0; l < s->nlist; l++) out[l] = s->lists[l].size;
}

void knn_store_capacities(void *h, int64_t *out) {
    knn_store *s = (knn_store *)h;
    for (int64_t l = 0; l < s->nlist; l++) out[l] = s->lists[l].cap;
}

void knn_store_segments(void *h, int64_t *out) {
    knn_store *s = (knn_store *)h;
    for (int64_t l = 0; l < s->nlist; l++) out[l] = s->lists[l].nseg;
}

/* Bytes held: every segment's codes and ids (its whole room), the list headers and their segment
 * tables. (The slabs' unused ends are address space, not memory: no page of them has been written.) */
int64_t knn_store_nbytes(void *h) {
    knn_store *s = (knn_store *)h;
    int64_t total = s->nlist * (int64_t)sizeof(knn_list);
    for (int64_t l = 0; l < s->nlist; l++)
        total += (int64_t)seg_bytes(s, s->lists[l].cap) + s->lists[l].room * (int64_t)sizeof(knn_seg);
    return total;
}

/* Every key's codes [n, dim] (row-major) and id [n], list 0 first, each list in insertion order. */
void knn_store_export(void *h, void *codes, int64_t *ids) {
    knn_store *s = (knn_store *)h;
    int64_t at = 0;
    for (int64_t l = 0; l < s->nlist; l++) {
        const knn_list *li = &s->lists[l];
        for (int64_t g = 0; g < li->nseg; g++) {
            const knn_seg *seg = &li->segs[g];
            const int32_t *seg_id = seg_ids(s, seg);
            for (int64_t j = 0; j < seg->size; j++, at++) {
                const uint8_t *src = (const uint8_t *)seg->codes + (j / KNN_LANES) * s->block_bytes;
                int64_t lane = j % KNN_LANES;
                if (s->kind == KIND_F32) {
                    for (int64_t i = 0; i < s->dim; i++)
                        ((float *)codes)[at * s->dim + i] = ((const float *)src)[slot(s, lane, i)];
                } else {
                    for (int64_t i = 0; i < s->dim; i++)
                        ((uint16_t *)codes)[at * s->dim + i] = ((const uint16_t *)src)[slot(s, lane, i)];
                }
                ids[at] = seg_id[j];
            }
        }
    }
}

/* Drop the keys of id >= n (ids rise along every list, so they are each list's tail; the room stays). */
void knn_store_truncate(void *h, int64_t n) {
    knn_store *s = (knn_store *)h;
    for (int64_t l = 0; l < s->nlist; l++) {
        knn_list *li = &s->lists[l];
        int64_t kept = 0, cur = -1;
        for (int64_t g = 0; g < li->nseg; g++) {
            knn_seg *seg = &li->segs[g];
            const int32_t *seg_id = seg_ids(s, seg);
            int64_t lo = 0, hi = seg->size; /* first position whose id is >= n */
            while (lo < hi) {
                int64_t mid = lo + (hi - lo) / 2;
                if (seg_id[mid] < n)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            seg->size = (int32_t)lo;
            kept += lo;
            if (cur < 0 && lo < seg->cap) cur = g;
        }
        li->size = kept;
        li->cur = cur < 0 ? (li->nseg ? li->nseg - 1 : 0) : cur;
    }
}

/* ------------------------------------------------------------------ element conversion */
static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: value man * 2^-24 */
            float f = ldexpf((float)man, -24);
            return sign ? -f : f;
        }
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ------------------------------------------------------------------ block scores
 * Each scores `nb` consecutive blocks (KNN_LANES keys each) against the query `qp` (float32,
 * zero-padded past `dim`): out[b * KNN_LANES + lane] = q . key, and masks[b] has the bits of the lanes
 * whose score is above `worst`. Lanes past a list's last key are scored too (the caller ignores them).
 */
/* Element `at` of `kind` from `data`, as float32. */
static inline float kind_elem(int64_t kind, const uint8_t *data, int64_t at) {
    if (kind == KIND_F32) return ((const float *)data)[at];
    if (kind == KIND_BF16) return bf16_to_f32(((const uint16_t *)data)[at]);
    return f16_to_f32(((const uint16_t *)data)[at]);
}

static inline float elem(const knn_store *s, const uint8_t *block, int64_t at) { return kind_elem(s->kind, block, at); }

static void score_scalar(const knn_store *s, const float *qp, const uint8_t *blocks, int64_t nb, float worst,
                         float *out, uint32_t *masks) {
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *block = blocks + b * s->block_bytes;
        uint32_t mask = 0;
        for (int64_t lane = 0; lane < KNN_LANES; lane++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < s->dim; i++) acc += qp[i] * elem(s, block, slot(s, lane, i));
            out[b * KNN_LANES + lane] = acc;
            mask |= (uint32_t)(acc > worst) << lane;
        }
        masks[b] = mask;
    }
}

#ifdef KNN_X86
/* One row (16 lanes) of a block as float32: the even and odd elements of a bfloat16 row (a 32-bit lane
 * holds an even element in its low half and the next odd one in its high half: a shift and a mask give
 * both as float32), or the one element of a float16 / float32 row (`odd` unused). */
#define KNN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) static inline

KNN_AVX512 void row512(const knn_store *s, const uint8_t *block, int64_t r, __m512 *even, __m512 *odd) {
    if (s->kind == KIND_BF16) {
        __m512i x = _mm512_loadu_si512((const void *)(block + 64 * r));
        __asm__("" : "+v"(x)); /* one load for both halves (gcc would fold it into each: ~25% slower) */
        *even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        *odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
    } else if (s->kind == KIND_F16) {
        *even = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 32 * r)));
    } else {
        *even = _mm512_loadu_ps((const float *)(block + 64 * r));
    }
}

/* Scores of G blocks from `block` on: the query's elements are broadcast once per row for all G
 * blocks, and each block has two chains of FMAs. */
KNN_AVX512 void blocks512(const knn_store *s, const float *qp, const uint8_t *block, int G, __m512 *out) {
    __m512 acc[4], acc2[4];
    for (int g = 0; g < G; g++) acc[g] = acc2[g] = _mm512_setzero_ps();
    if (s->kind == KIND_BF16) {
        for (int64_t r = 0; r < s->rows; r++) {
            const __m512 e = _mm512_set1_ps(qp[2 * r]), o = _mm512_set1_ps(qp[2 * r + 1]);
            for (int g = 0; g < G; g++) {
                __m512 xe, xo;
                row512(s, block + g * s->block_bytes, r, &xe, &xo);
                acc[g] = _mm512_fmadd_ps(xe, e, acc[g]);
                acc2[g] = _mm512_fmadd_ps(xo, o, acc2[g]);
            }
        }
    } else {
        int64_t r = 0;
        for (; r + 2 <= s->rows; r += 2) {
            const __m512 e = _mm512_set1_ps(qp[r]), o = _mm512_set1_ps(qp[r + 1]);
            for (int g = 0; g < G; g++) {
                __m512 x0, x1, unused;
                row512(s, block + g * s->block_bytes, r, &x0, &unused);
                row512(s, block + g * s->block_bytes, r + 1, &x1, &unused);
                acc[g] = _mm512_fmadd_ps(x0, e, acc[g]);
                acc2[g] = _mm512_fmadd_ps(x1, o, acc2[g]);
            }
        }
        if (r < s->rows) {
            const __m512 e = _mm512_set1_ps(qp[r]);
            for (int g = 0; g < G; g++) {
                __m512 x0, unused;
                row512(s, block + g * s->block_bytes, r, &x0, &unused);
                acc[g] = _mm512_fmadd_ps(x0, e, acc[g]);
            }
        }
    }
    for (int g = 0; g < G; g++) out[g] = _mm512_add_ps(acc[g], acc2[g]);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void score_avx512(
    const knn_store *s, const float *qp, const uint8_t *blocks, int64_t nb, float worst, float *out,
    uint32_t *masks) {
    const __m512 w = _mm512_set1_ps(worst);
    __m512 sc[4];
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        blocks512(s, qp, blocks + b * s->block_bytes, 4, sc);
        for (int g = 0; g < 4; g++) {
            _mm512_storeu_ps(out + (b + g) * KNN_LANES, sc[g]);
            masks[b + g] = (uint32_t)_mm512_cmp_ps_mask(sc[g], w, _CMP_GT_OQ);
        }
    }
    for (; b < nb; b++) {
        blocks512(s, qp, blocks + b * s->block_bytes, 1, sc);
        _mm512_storeu_ps(out + b * KNN_LANES, sc[0]);
        masks[b] = (uint32_t)_mm512_cmp_ps_mask(sc[0], w, _CMP_GT_OQ);
    }
}

/* the 8 lanes of one half (0: lanes 0-7, 1: lanes 8-15) of a block row */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 row_half(const knn_store *s, const uint8_t *block,
                                                                     int64_t r, int half) {
    if (s->kind == KIND_F32) return _mm256_loadu_ps((const float *)(block + 64 * r + 32 * half));
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + 32 * r + 16 * half)));
}

__attribute__((target("avx2,fma,f16c"))) static void score_avx2(const knn_store *s, const float *qp,
                                                              const uint8_t *blocks, int64_t nb, float worst,
                                                              float *out, uint32_t *masks) {
    const __m256 w = _mm256_set1_ps(worst);
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *block = blocks + b * s->block_bytes;
        __m256 lo0 = _mm256_setzero_ps(), lo1 = _mm256_setzero_ps(), hi0 = _mm256_setzero_ps(),
               hi1 = _mm256_setzero_ps();
        for (int64_t r = 0; r < s->rows; r++) {
            if (s->kind == KIND_BF16) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(block + 64 * r));
                __m256i y = _mm256_loadu_si256((const __m256i *)(block + 64 * r + 32));
                __m256 e = _mm256_set1_ps(qp[2 * r]), o = _mm256_set1_ps(qp[2 * r + 1]);
                lo0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)), e, lo0);
                lo1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(x, high)), o, lo1);
                hi0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(y, 16)), e, hi0);
                hi1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(y, high)), o, hi1);
            } else {
                __m256 qr = _mm256_set1_ps(qp[r]);
                if (r & 1) {
                    lo1 = _mm256_fmadd_ps(row_half(s, block, r, 0), qr, lo1);
                    hi1 = _mm256_fmadd_ps(row_half(s, block, r, 1), qr, hi1);
                } else {
                    lo0 = _mm256_fmadd_ps(row_half(s, block, r, 0), qr, lo0);
                    hi0 = _mm256_fmadd_ps(row_half(s, block, r, 1), qr, hi0);
                }
            }
        }
        __m256 lo = _mm256_add_ps(lo0, lo1), hi = _mm256_add_ps(hi0, hi1);
        _mm256_storeu_ps(out + b * KNN_LANES, lo);
        _mm256_storeu_ps(out + b * KNN_LANES + 8, hi);
        masks[b] = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(lo, w, _CMP_GT_OQ)) |
                   ((uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(hi, w, _CMP_GT_OQ)) << 8);
    }
}
#endif

/* ------------------------------------------------------------------ top-k selection
 * A reservoir of (score, id) candidates: a candidate is appended when it beats `thr`, a lower bound of
 * the k-th best so far; when the reservoir is full, a bisection keeps between k and 2k of the best and
 * `thr` becomes the smallest kept (the exact k best are selected once, at the end). Appending costs a compare and two stores, where a heap would sift
 * (unpredictable branches) on every better key: the scan finds many, since it visits the best lists
 * first. */
typedef struct {
    float *s;
    int32_t *id;
    int64_t n, keep, room;
    float thr; /* -FLT_MAX until `keep` candidates were kept */
} knn_topk;

static int topk_new(knn_topk *t, int64_t keep, int64_t extra) {
    t->keep = keep;
    t->room = 3 * keep + 64 + extra; /* `extra`: candidates a caller may append between checks */
    t->s = (float *)malloc((size_t)t->room * sizeof(float));
    t->id = (int32_t *)malloc((size_t)t->room * sizeof(int32_t));
    t->n = 0;
    t->thr = -FLT_MAX;
    return t->s && t->id ? 0 : -1;
}

static void topk_free(knn_topk *t) {
    free(t->s);
    free(t->id);
}

static inline void swap_pair(float *s, int32_t *id, int64_t a, int64_t b) {
    float ts = s[a];
    int32_t ti = id[a];
    s[a] = s[b];
    id[a] = id[b];
    s[b] = ts;
    id[b] = ti;
}

/* Floats as unsigned ints of the same order (and back). */
static inline uint32_t order_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float order_value(uint32_t key) {
    uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* How many of s [n] are >= t (a loop the compiler vectorises; one version per instruction set). */
#if defined(KNN_X86) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static int64_t count_ge(const float *s, int64_t n, float t) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += s[i] >= t;
    return c;
}

#ifdef KNN_X86
/* Every entry of s / id [n] that is >= t moved forward, in order (compressed 16 at a time); returns how
 * many. A full store at `at` <= i only overwrites entries already loaded. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static int64_t keep_ge_512(float *s, int32_t *id, int64_t n,
                                                                              float t) {
    const __m512 tt = _mm512_set1_ps(t);
    int64_t at = 0, i = 0;
    for (; i + KNN_LANES <= n; i += KNN_LANES) {
        const __m512 v = _mm512_loadu_ps(s + i);
        const __m512i vi = _mm512_loadu_si512((const void *)(id + i));
        const __mmask16 k = _mm512_cmp_ps_mask(v, tt, _CMP_GE_OQ);
        _mm512_storeu_ps(s + at, _mm512_maskz_compress_ps(k, v));
        _mm512_storeu_si512((void *)(id + at), _mm512_maskz_compress_epi32(k, vi));
        at += __builtin_popcount((unsigned)k);
    }
    if (i < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(tail, s + i);
        const __m512i vi = _mm512_maskz_loadu_epi32(tail, (const void *)(id + i));
        const __mmask16 k = _mm512_mask_cmp_ps_mask(tail, v, tt, _CMP_GE_OQ);
        _mm512_mask_compressstoreu_ps(s + at, k, v);
        _mm512_mask_compressstoreu_epi32((void *)(id + at), k, vi);
        at += __builtin_popcount((unsigned)k);
    }
    return at;
}
#endif

/* Reorder s / id [n] (n >= keep) so that a run of the largest comes first, in their order in s, and
 * return its length c, keep <= c <= most: every entry >= t for a threshold t with keep <= (entries
 * >= t) <= most, found by bisection over the float order with vectorised counts (no data-dependent
 * branches: a quickselect mispredicts about every other comparison on such data) between the smallest
 * and the largest entry. With most == keep it is exact: the keep largest (of entries equal to the
 * keep-th largest, the earliest). A wider band (a reservoir's intermediate trims) takes fewer steps. */
static int64_t trim_largest(float *s, int32_t *id, int64_t n, int64_t keep, int64_t most) {
    uint32_t lo = UINT32_MAX, hi = 0; /* the order keys of the smallest and largest entry */
    for (int64_t i = 0; i < n; i++) {
        const uint32_t key = order_key(s[i]);
        lo = key < lo ? key : lo;
        hi = key > hi ? key : hi;
    }
    /* count_ge(order_value(lo)) = c >= keep > count_ge(order_value(hi + 1)); stop once c <= most */
    int64_t c = n;
    while (c > most && lo < hi) {
        const uint32_t mid = lo + (hi - lo + 1) / 2;
        const int64_t cm = count_ge(s, n, order_value(mid));
        if (cm >= keep) lo = mid, c = cm;
        else hi = mid - 1;
    }
    const float t = order_value(lo);
    if (c <= most) { /* every entry >= t: move them forward */
#ifdef KNN_X86
        if (knn_isa() == ISA_AVX512) return keep_ge_512(s, id, n, t);
#endif
        int64_t at = 0;
        for (int64_t i = 0; i < n; i++) { /* branch-free; what is overwritten is dropped anyway */
            const float v = s[i];
            const int32_t vi = id[i];
            s[at] = v;
            id[at] = vi;
            at += v >= t;
        }
        return at;
    }
    int64_t above = 0; /* lo == hi: ties at the keep-th value: every entry > t and the earliest == t */
    for (int64_t i = 0; i < n; i++) above += s[i] > t;
    int64_t ties = keep - above, at = 0;
    for (int64_t i = 0; i < n; i++) {
        const float v = s[i];
        const int32_t vi = id[i];
        const int take = (v > t) | ((v == t) & (ties > 0));
        ties -= (v == t) & take;
        s[at] = v;
        id[at] = vi;
        at += take;
    }
    return at;
}

/* Reorder s / id [n] so that the `keep` largest come first, in their order in s (of entries equal to the
 * keep-th largest, the earliest). */
static void select_largest(float *s, int32_t *id, int64_t n, int64_t keep) {
    if (n > keep) trim_largest(s, id, n, keep, keep);
}

/* Keep candidates that can still be among the `keep` best: exactly the `keep` best when `exact`, else
 * between keep and 2 keep of the best (cheaper, for a reservoir that is still filling); `thr` becomes
 * the smallest kept (a lower bound of the k-th best) once `keep` are kept. */
static void topk_trim(knn_topk *t, int exact) {
    const int64_t most = exact ? t->keep : 2 * t->keep;
    if (t->n > most) t->n = trim_largest(t->s, t->id, t->n, t->keep, most);
    if (t->n >= t->keep) {
        float m = t->s[0];
        for (int64_t i = 1; i < t->n; i++) m = t->s[i] < m ? t->s[i] : m;
        t->thr = m;
    }
}

/* Keep the `keep` best; `thr` becomes the k-th best (when there are `keep`). */
static void topk_compact(knn_topk *t) { topk_trim(t, 1); }

static void sift_down_min(float *s, int32_t *id, int64_t size, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, c;
        if (l >= size) return;
        c = (r < size && s[r] < s[l]) ? r : l;
        if (s[c] >= s[i]) return;
        swap_pair(s, id, i, c);
        i = c;
    }
}

/* A threshold from the candidates so far (later keys below it are not even appended), once there are k,
 * then again whenever the reservoir holds 4k. */
static inline void topk_settle(knn_topk *t) {
    if (t->n >= 4 * t->keep || (t->thr == -FLT_MAX && t->n >= t->keep)) topk_trim(t, 0);
}

/* Sort s / id [n] by score, largest first (insertion sort for the small k of attention; heapsort else). */
static void sort_desc(float *s, int32_t *id, int64_t n) {
    if (n <= 64) {
        for (int64_t i = 1; i < n; i++) {
            float v = s[i];
            int32_t vi = id[i];
            int64_t j = i - 1;
            while (j >= 0 && s[j] < v) {
                s[j + 1] = s[j];
                id[j + 1] = id[j];
                j--;
            }
            s[j + 1] = v;
            id[j + 1] = vi;
        }
        return;
    }
    /* min-heap, then pop the smallest to the back */
    for (int64_t i = n / 2 - 1; i >= 0; i--) sift_down_min(s, id, n, i);
    for (int64_t size = n; size > 1; size--) {
        swap_pair(s, id, 0, size - 1);
        sift_down_min(s, id, size - 1, 0);
    }
}

/* ------------------------------------------------------------------ the scan */
#define KNN_RUN 16 /* blocks scored per kernel call */

typedef struct { /* what a query's scan needs besides its reservoir: one run's scores and masks */
    float buf[KNN_RUN * KNN_LANES];
    uint32_t masks[KNN_RUN];
} knn_scratch;

/* True when k of the candidates kept beat `b`, i.e. the k-th best so far is above it. Every key that
 * beats `b` >= thr is among the candidates (a key left out or dropped was <= thr), so this is the exact
 * test, without selecting the k-th (a plain count: the compiler vectorises it). */
static int k_beat(const knn_topk *t, float b) {
    int64_t count = 0;
    for (int64_t i = 0; i < t->n; i++) count += t->s[i] > b;
    return count >= t->keep;
}

/* One segment `seg` of a list for one query (`qp`, zero-padded; reservoir `t`): the keys above the
 * query's threshold of the moment become its candidates. */
static void scan_segment(const knn_store *s, knn_scratch *w, knn_topk *t, const float *qp, int isa,
                         const knn_seg *seg, int64_t *stats) {
    const int64_t blocks = (seg->size + KNN_LANES - 1) / KNN_LANES;
    const int32_t *ids = seg_ids(s, seg);
    for (int64_t b0 = 0; b0 < blocks; b0 += KNN_RUN) {
        const int64_t nb = blocks - b0 < KNN_RUN ? blocks - b0 : KNN_RUN;
        const uint8_t *x = seg->codes + b0 * s->block_bytes;
        if (t->n + nb * KNN_LANES > t->room) topk_trim(t, 0);
        const int64_t before = t->n;
#ifdef KNN_X86
        if (isa == ISA_AVX512)
            score_avx512(s, qp, x, nb, t->thr, w->buf, w->masks);
        else if (isa == ISA_AVX2)
            score_avx2(s, qp, x, nb, t->thr, w->buf, w->masks);
        else
#endif
            score_scalar(s, qp, x, nb, t->thr, w->buf, w->masks);
        for (int64_t b = 0; b < nb; b++) {
            uint32_t mask = w->masks[b];
            const int64_t first = (b0 + b) * KNN_LANES, valid = seg->size - first;
            if (valid < KNN_LANES) mask &= (1u << valid) - 1u;
            while (mask) {
                const int lane = __builtin_ctz(mask);
                mask &= mask - 1u;
                t->s[t->n] = w->buf[b * KNN_LANES + lane];
                t->id[t->n] = ids[first + lane];
                t->n++;
            }
        }
        stats[3] += t->n - before;
        topk_settle(t);
    }
}

/* One query (`qp`, zero-padded; its reservoir `t` holds what it found so far) from its list `start` on: scan `ranked` [cap] lists with bounds `bound` [cap] as the header says;
 * its top-k, best first, into os / oi [k]. */
static void scan_query(const knn_store *s, knn_scratch *w, knn_topk *t, const float *qp, int isa, int64_t k,
                       const int64_t *ranked, const float *bound, int64_t start, int64_t cap, int64_t nprobe,
                       float *os, int64_t *oi, int64_t *stats) {
    for (int64_t j = start; j < cap; j++) {
        /* certain: no key left can enter the top-k (thr is a lower bound of the k-th best, so the first
         * test is safe and cheap; the second is exact) */
        if (j >= nprobe && ((t->thr > -FLT_MAX && bound[j] < t->thr) || k_beat(t, bound[j]))) break;
        if (j == cap - 1 && j >= nprobe) stats[2]++;
        const knn_list *li = &s->lists[ranked[j]];
        stats[0]++;
        stats[1] += li->size;
        for (int64_t g = 0; g < li->nseg; g++) scan_segment(s, w, t, qp, isa, &li->segs[g], stats);
    }
    topk_compact(t);
    sort_desc(t->s, t->id, t->n);
    for (int64_t r = 0; r < k; r++) {
        os[r] = r < t->n ? t->s[r] : -INFINITY;
        oi[r] = r < t->n ? t->id[r] : -1;
    }
}

#ifdef KNN_X86
#define KNN_GROUP 8    /* queries scored together against one block (16 or 8 accumulators) */
#define KNN_PREFETCH 4 /* blocks ahead that the first pass over a list prefetches */
/* CALL(n) with the group size G (1 .. KNN_GROUP) as the constant n: a kernel compiled per size keeps
 * its accumulators in registers */
#define KNN_EACH_GROUP_SIZE(G, CALL) \
    switch (G) {                     \
        case 1: CALL(1); break;      \
        case 2: CALL(2); break;      \
        case 3: CALL(3); break;      \
        case 4: CALL(4); break;      \
        case 5: CALL(5); break;      \
        case 6: CALL(6); break;      \
        case 7: CALL(7); break;      \
        default: CALL(KNN_GROUP);    \
    }

/* Scores of one block for G queries (pointers to their padded vectors): each row is loaded once.
 * `width` 2 (bfloat16) or 1; G and width are constants at every call, so the accumulators stay in
 * registers. */
KNN_AVX512 void block_multi(const knn_store *s, const float *const *qv, const int G, const int width,
                            const uint8_t *block, __m512 *out) {
    __m512 acc[KNN_GROUP], acc2[KNN_GROUP];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) acc[g] = acc2[g] = _mm512_setzero_ps();
    if (width == 2) {
        for (int64_t r = 0; r < s->rows; r++) {
            __m512 xe, xo = _mm512_setzero_ps();
            row512(s, block, r, &xe, &xo);
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) { /* the sums of blocks512, in the same order: the same bits */
                acc[g] = _mm512_fmadd_ps(xe, _mm512_set1_ps(qv[g][2 * r]), acc[g]);
                acc2[g] = _mm512_fmadd_ps(xo, _mm512_set1_ps(qv[g][2 * r + 1]), acc2[g]);
            }
        }
    } else {
        for (int64_t r = 0; r < s->rows; r++) {
            __m512 x, unused;
            row512(s, block, r, &x, &unused);
            if (r & 1) {
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) acc2[g] = _mm512_fmadd_ps(x, _mm512_set1_ps(qv[g][r]), acc2[g]);
            } else {
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(x, _mm512_set1_ps(qv[g][r]), acc[g]);
            }
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) out[g] = _mm512_add_ps(acc[g], acc2[g]);
}

/* Append the lanes `mask` of the scores sc (the ids [16] of their block) to the reservoir t: both
 * compressed in registers and stored whole (the reservoir has room for 16 past its end). */
__attribute__((target("avx512f,avx512bw,avx512vl"), noinline)) static void take_lanes(knn_topk *t, __m512 sc,
                                                                                     const int32_t *ids,
                                                                                     uint32_t mask,
                                                                                     int64_t *stats) {
    if (t->n + KNN_LANES > t->room) topk_trim(t, 0);
    const __mmask16 k = (__mmask16)mask;
    _mm512_storeu_ps(t->s + t->n, _mm512_maskz_compress_ps(k, sc));
    _mm512_storeu_si512((void *)(t->id + t->n), _mm512_maskz_compress_epi32(k, _mm512_loadu_si512((const void *)ids)));
    const int taken = __builtin_popcount(mask);
    t->n += taken;
    stats[3] += taken;
    topk_settle(t);
}

/* The lanes of sc [G] above each query's threshold thr [G] (`lanes`: the valid ones) into the queries'
 * reservoirs t [G]; ids [16] of the block. */
KNN_AVX512 void take_above(const int G, const __m512 *sc, float *thr, uint32_t lanes, const int32_t *ids,
                           knn_topk *const *t, int64_t *stats) {
    uint32_t masks[KNN_GROUP], any = 0;
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
        masks[g] = (uint32_t)_mm512_cmp_ps_mask(sc[g], _mm512_set1_ps(thr[g]), _CMP_GT_OQ) & lanes;
        any |= masks[g];
    }
    if (!any) return;
    for (int g = 0; g < G; g++) {
        if (!masks[g]) continue;
        take_lanes(t[g], sc[g], ids, masks[g], stats);
        thr[g] = t[g]->thr;
    }
}

/* Every block of list li for G queries qv [G] (reservoirs t [G]): the lanes above a query's threshold
 * of the moment become its candidates. Scores are stored only for a block where some lane is above.
 * `prefetch`: the list is not yet in cache (the first pass over it) and blocks ahead are fetched. */
KNN_AVX512 void list_multi(const knn_store *s, const knn_seg *li, const float *const *qv, const int G,
                           const int width, knn_topk *const *t, int prefetch, int64_t *stats) {
    float thr[KNN_GROUP];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) thr[g] = t[g]->thr;
    const uint8_t *codes = li->codes;
    const int32_t *ids = seg_ids(s, li);
    const int64_t nb = (li->size + KNN_LANES - 1) / KNN_LANES, bb = s->block_bytes;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *block = codes + b * bb;
        if (prefetch && b + KNN_PREFETCH < nb)
            for (int64_t at = 0; at < bb; at += 64) _mm_prefetch((const char *)block + KNN_PREFETCH * bb + at, _MM_HINT_T0);
        __m512 sc[KNN_GROUP];
        block_multi(s, qv, G, width, block, sc);
        const int64_t valid = li->size - b * KNN_LANES;
        const uint32_t lanes = valid < KNN_LANES ? (1u << valid) - 1u : 0xffffu;
        take_above(G, sc, thr, lanes, ids + b * KNN_LANES, t, stats);
    }
}

/* list_multi with G (1 .. KNN_GROUP) and the width as constants. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void scan_group(const knn_store *s, const knn_seg *li,
                                                                          const float *const *qv, int G,
                                                                          knn_topk *const *t, int prefetch,
                                                                          int64_t *stats) {
#define KNN_CALL(n)                                         \
    if (s->width == 2)                                      \
        list_multi(s, li, qv, n, 2, t, prefetch, stats);    \
    else                                                    \
        list_multi(s, li, qv, n, 1, t, prefetch, stats)
    KNN_EACH_GROUP_SIZE(G, KNN_CALL);
#undef KNN_CALL
}

/* The same shared scan with AVX2: a block's 16 lanes are two halves of 8, and each query sums four chains
 * (even and odd rows of each half) as score_avx2 does, in the same order: the same bits. Four chains per
 * query and 16 registers allow groups of up to KNN_GROUP_AVX2 queries. */
#define KNN_GROUP_AVX2 3
#define KNN_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

/* Scores of one block for G queries: lanes 0-7 into lo[g], 8-15 into hi[g]; each row loaded once. */
KNN_AVX2 void block_multi_avx2(const knn_store *s, const float *const *qv, const int G, const int width,
                               const uint8_t *block, __m256 *lo, __m256 *hi) {
    __m256 lo0[KNN_GROUP_AVX2], lo1[KNN_GROUP_AVX2], hi0[KNN_GROUP_AVX2], hi1[KNN_GROUP_AVX2];
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) lo0[g] = lo1[g] = hi0[g] = hi1[g] = _mm256_setzero_ps();
    if (width == 2) {
        const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
        for (int64_t r = 0; r < s->rows; r++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(block + 64 * r));
            __m256i y = _mm256_loadu_si256((const __m256i *)(block + 64 * r + 32));
            __asm__("" : "+x"(x), "+x"(y)); /* one load each, not one per use */
            const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
            const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(x, high));
            const __m256 ye = _mm256_castsi256_ps(_mm256_slli_epi32(y, 16));
            const __m256 yo = _mm256_castsi256_ps(_mm256_and_si256(y, high));
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) {
                const __m256 e = _mm256_set1_ps(qv[g][2 * r]), o = _mm256_set1_ps(qv[g][2 * r + 1]);
                lo0[g] = _mm256_fmadd_ps(xe, e, lo0[g]);
                lo1[g] = _mm256_fmadd_ps(xo, o, lo1[g]);
                hi0[g] = _mm256_fmadd_ps(ye, e, hi0[g]);
                hi1[g] = _mm256_fmadd_ps(yo, o, hi1[g]);
            }
        }
    } else {
        for (int64_t r = 0; r < s->rows; r++) {
            const __m256 a = row_half(s, block, r, 0), b = row_half(s, block, r, 1);
            if (r & 1) {
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) {
                    const __m256 qr = _mm256_set1_ps(qv[g][r]);
                    lo1[g] = _mm256_fmadd_ps(a, qr, lo1[g]);
                    hi1[g] = _mm256_fmadd_ps(b, qr, hi1[g]);
                }
            } else {
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) {
                    const __m256 qr = _mm256_set1_ps(qv[g][r]);
                    lo0[g] = _mm256_fmadd_ps(a, qr, lo0[g]);
                    hi0[g] = _mm256_fmadd_ps(b, qr, hi0[g]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) {
        lo[g] = _mm256_add_ps(lo0[g], lo1[g]);
        hi[g] = _mm256_add_ps(hi0[g], hi1[g]);
    }
}

/* Append the lanes `mask` of one block's scores sc [16] (ids [16]) to the reservoir t, in lane order. */
static void take_lanes_plain(knn_topk *t, const float *sc, const int32_t *ids, uint32_t mask, int64_t *stats) {
    if (t->n + KNN_LANES > t->room) topk_trim(t, 0);
    const int64_t before = t->n;
    while (mask) {
        const int lane = __builtin_ctz(mask);
        mask &= mask - 1u;
        t->s[t->n] = sc[lane];
        t->id[t->n] = ids[lane];
        t->n++;
    }
    stats[3] += t->n - before;
    topk_settle(t);
}

/* list_multi with AVX2. */
KNN_AVX2 void list_multi_avx2(const knn_store *s, const knn_seg *li, const float *const *qv, const int G,
                              const int width, knn_topk *const *t, int prefetch, int64_t *stats) {
    float thr[KNN_GROUP_AVX2];
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) thr[g] = t[g]->thr;
    const uint8_t *codes = li->codes;
    const int32_t *ids = seg_ids(s, li);
    const int64_t nb = (li->size + KNN_LANES - 1) / KNN_LANES, bb = s->block_bytes;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *block = codes + b * bb;
        if (prefetch && b + KNN_PREFETCH < nb)
            for (int64_t at = 0; at < bb; at += 64) _mm_prefetch((const char *)block + KNN_PREFETCH * bb + at, _MM_HINT_T0);
        __m256 lo[KNN_GROUP_AVX2], hi[KNN_GROUP_AVX2];
        block_multi_avx2(s, qv, G, width, block, lo, hi);
        const int64_t valid = li->size - b * KNN_LANES;
        const uint32_t lanes = valid < KNN_LANES ? (1u << valid) - 1u : 0xffffu;
        uint32_t masks[KNN_GROUP_AVX2], any = 0;
#pragma GCC unroll 4
        for (int g = 0; g < G; g++) {
            const __m256 w = _mm256_set1_ps(thr[g]);
            masks[g] = ((uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(lo[g], w, _CMP_GT_OQ)) |
                        ((uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(hi[g], w, _CMP_GT_OQ)) << 8)) &
                       lanes;
            any |= masks[g];
        }
        if (!any) continue;
        for (int g = 0; g < G; g++) {
            if (!masks[g]) continue;
            float sc[KNN_LANES];
            _mm256_storeu_ps(sc, lo[g]);
            _mm256_storeu_ps(sc + 8, hi[g]);
            take_lanes_plain(t[g], sc, ids + b * KNN_LANES, masks[g], stats);
            thr[g] = t[g]->thr;
        }
    }
}

/* list_multi_avx2 with G (1 .. KNN_GROUP_AVX2) and the width as constants. */
__attribute__((target("avx2,fma,f16c"))) static void scan_group_avx2(const knn_store *s, const knn_seg *li,
                                                                   const float *const *qv, int G,
                                                                   knn_topk *const *t, int prefetch,
                                                                   int64_t *stats) {
#define KNN_CALL(n)                                              \
    if (s->width == 2)                                           \
        list_multi_avx2(s, li, qv, n, 2, t, prefetch, stats);    \
    else                                                         \
        list_multi_avx2(s, li, qv, n, 1, t, prefetch, stats)
    switch (G) {
        case 1: KNN_CALL(1); break;
        case 2: KNN_CALL(2); break;
        default: KNN_CALL(KNN_GROUP_AVX2);
    }
#undef KNN_CALL
}
#endif

/* The first p0 lists of every query (all scanned, in any order): list by list, each block loaded once
 * for every group of up to KNN_GROUP queries that rank the list there (a window's queries share many
 * lists: ~9 queries per list on the embedded model's own queries at 512k keys, 8 lists each). A list's
 * queries are split into groups of equal size (9 -> 5 + 4, not 8 + 1: a group of one is bound by the
 * latency of its loads). With AVX-512 (groups of up to KNN_GROUP) or AVX2 (up to KNN_GROUP_AVX2); returns 0
 * (nothing done) with neither, else p0. */
static int64_t scan_shared(const knn_store *s, int isa, int64_t m, const float *qps, int64_t dp, const int64_t *ranked,
                           int64_t cap, int64_t p0, knn_topk *tops, int64_t *stats) {
#ifdef KNN_X86
    if (isa < ISA_AVX2 || p0 == 0 || m < 2) return 0;
    const int64_t most = isa >= ISA_AVX512 ? KNN_GROUP : KNN_GROUP_AVX2; /* queries per group */
    const int64_t L = s->nlist;
    int64_t *first = (int64_t *)calloc((size_t)L + 1, sizeof(int64_t));
    int32_t *who = (int32_t *)malloc((size_t)(m * p0) * sizeof(int32_t));
    if (!first || !who) {
        free(first);
        free(who);
        return 0; /* the per-query scan does it all */
    }
    for (int64_t iq = 0; iq < m; iq++)
        for (int64_t j = 0; j < p0; j++) first[ranked[iq * cap + j] + 1]++;
    for (int64_t l = 0; l < L; l++) first[l + 1] += first[l];
    for (int64_t iq = 0; iq < m; iq++) /* counting sort: the queries of list l at who[first[l]..] */
        for (int64_t j = 0; j < p0; j++) who[first[ranked[iq * cap + j]]++] = (int32_t)iq;
    for (int64_t l = L; l > 0; l--) first[l] = first[l - 1];
    first[0] = 0;
    /* lists in the order of the best place any query ranks them (then by number): each query meets its
     * best lists early, so its threshold rises early and fewer keys become top-k candidates */
    int64_t *order = (int64_t *)malloc((size_t)L * sizeof(int64_t));
    uint8_t *place = (uint8_t *)malloc((size_t)L);
    if (!order || !place) {
        free(first);
        free(who);
        free(order);
        free(place);
        return 0;
    }
    memset(place, 255, (size_t)L);
    for (int64_t iq = 0; iq < m; iq++)
        for (int64_t j = 0; j < p0 && j < 255; j++) {
            const int64_t l = ranked[iq * cap + j];
            if (place[l] > j) place[l] = (uint8_t)j;
        }
    int64_t start[257] = {0}; /* counting sort of the scanned lists by place */
    for (int64_t l = 0; l < L; l++)
        if (first[l + 1] > first[l]) start[place[l] + 1]++;
    for (int level = 0; level < 256; level++) start[level + 1] += start[level];
    const int64_t at = start[256];
    for (int64_t l = 0; l < L; l++)
        if (first[l + 1] > first[l]) order[start[place[l]]++] = l;
    for (int64_t o = 0; o < at; o++) {
        const knn_list *li = &s->lists[order[o]];
        if (o + 1 < at && s->lists[order[o + 1]].nseg) { /* the start of the next list, whose first blocks
                                                            the prefetch ahead skips */
            const knn_seg *next = &s->lists[order[o + 1]].segs[0];
            const int64_t nb = (next->size + KNN_LANES - 1) / KNN_LANES;
            const int64_t bytes = (nb < KNN_PREFETCH ? nb : KNN_PREFETCH) * s->block_bytes;
            for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)next->codes + b, _MM_HINT_T0);
        }
        const int64_t q0 = first[order[o]], nq = first[order[o] + 1] - q0;
        const int64_t groups = (nq + most - 1) / most;
        for (int64_t gi = 0, g0 = q0; gi < groups; gi++) {
            const int64_t left = q0 + nq - g0, G = (left + (groups - gi) - 1) / (groups - gi);
            const float *qv[KNN_GROUP];
            knn_topk *t[KNN_GROUP];
            for (int64_t g = 0; g < G; g++) {
                qv[g] = qps + who[g0 + g] * dp;
                t[g] = &tops[who[g0 + g]];
            }
            stats[0] += G;
            stats[1] += G * li->size;
            for (int64_t sg = 0; sg < li->nseg && li->segs[sg].size; sg++) {
                if (isa >= ISA_AVX512)
                    scan_group(s, &li->segs[sg], qv, (int)G, t, gi == 0, stats);
                else
                    scan_group_avx2(s, &li->segs[sg], qv, (int)G, t, gi == 0, stats);
            }
            g0 += G;
        }
    }
    free(first);
    free(who);
    free(order);
    free(place);
    return p0;
#else
    (void)s, (void)isa, (void)m, (void)qps, (void)dp, (void)ranked, (void)cap, (void)p0, (void)tops, (void)stats;
    return 0;
#endif
}

/* Every query's scan (see the header) over its ranked lists [m, cap] with their bounds [m, cap]. */
static int scan_all(const knn_store *s, int64_t m, const float *q, int64_t k, const int64_t *ranked,
                    const float *bounds, int64_t cap, int64_t nprobe, float *out_s, int64_t *out_i, int64_t *stats) {
    knn_scratch w;
    const int isa = knn_isa();
    const int64_t dp = (s->rows * s->width + 31) / 16 * 16; /* padded query length (zeros past dim) */
    float *qps = (float *)calloc((size_t)(m * dp), sizeof(float));
    knn_topk *tops = (knn_topk *)calloc((size_t)m, sizeof(knn_topk));
    int rc = qps && tops ? 0 : -1;
    for (int64_t iq = 0; rc == 0 && iq < m; iq++) {
        memcpy(qps + iq * dp, q + iq * s->dim, (size_t)s->dim * sizeof(float));
        rc = topk_new(&tops[iq], k, KNN_RUN * KNN_LANES);
    }
    if (rc == 0) {
        const int64_t start = scan_shared(s, isa, m, qps, dp, ranked, cap, nprobe < cap ? nprobe : cap, tops, stats);
        for (int64_t iq = 0; iq < m; iq++)
            scan_query(s, &w, &tops[iq], qps + iq * dp, isa, k, ranked + iq * cap, bounds + iq * cap, start, cap,
                       nprobe, out_s + iq * k, out_i + iq * k, stats);
    }
    for (int64_t iq = 0; tops && iq < m; iq++) topk_free(&tops[iq]);
    free(tops);
    free(qps);
    return rc;
}

/* For each of the m queries q [m, dim]: scan its lists [m, cap] (ranked, with their bounds [m, cap]) as
 * the header says and write its top-k (scores, ids) [m, k], best first; empty slots get -inf and -1.
 * stats[0..3] += lists scanned, keys scanned, queries that scanned all `cap` lists (cap > nprobe), keys
 * that were candidates for the top-k (above the threshold of the moment).
 * Returns 0, or -1 when out of memory. */
int knn_scan(void *h, int64_t m, const float *q, int64_t k, int64_t cap, int64_t nprobe, const int64_t *lists,
             const float *bounds, float *out_s, int64_t *out_i, int64_t *stats) {
    return scan_all((const knn_store *)h, m, q, k, lists, bounds, cap, nprobe, out_s, out_i, stats);
}

#ifdef KNN_X86
/* Scores of two blocks (b0, b1) for G queries qv [G]: each query element is broadcast once for both,
 * and each (block, query) has one chain of FMAs (two loads per 2 G FMAs: the FMA units, not the loads,
 * set the pace, where block_multi loads G + 1 per G). */
KNN_AVX512 void pair_multi(const knn_store *s, const float *const *qv, const int G, const int width,
                           const uint8_t *b0, const uint8_t *b1, __m512 *out0, __m512 *out1) {
    __m512 a0[KNN_GROUP], a1[KNN_GROUP];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) a0[g] = a1[g] = _mm512_setzero_ps();
    for (int64_t r = 0; r < s->rows; r++) {
        __m512 e0, o0 = _mm512_setzero_ps(), e1, o1 = _mm512_setzero_ps();
        row512(s, b0, r, &e0, &o0);
        row512(s, b1, r, &e1, &o1);
        if (width == 2) {
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                const __m512 qe = _mm512_set1_ps(qv[g][2 * r]), qo = _mm512_set1_ps(qv[g][2 * r + 1]);
                a0[g] = _mm512_fmadd_ps(o0, qo, _mm512_fmadd_ps(e0, qe, a0[g]));
                a1[g] = _mm512_fmadd_ps(o1, qo, _mm512_fmadd_ps(e1, qe, a1[g]));
            }
        } else {
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                const __m512 qr = _mm512_set1_ps(qv[g][r]);
                a0[g] = _mm512_fmadd_ps(e0, qr, a0[g]);
                a1[g] = _mm512_fmadd_ps(e1, qr, a1[g]);
            }
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) out0[g] = a0[g], out1[g] = a1[g];
}

/* Every block of a packed tile li for G queries, two blocks at a time (a last odd block is scored as
 * the pair of itself, so a key's score never depends on its place). */
KNN_AVX512 void tile_multi(const knn_store *s, const knn_seg *li, const float *const *qv, const int G,
                           const int width, knn_topk *const *t, int64_t *stats) {
    float thr[KNN_GROUP];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) thr[g] = t[g]->thr;
    const uint8_t *codes = li->codes;
    const int32_t *ids = seg_ids(s, li);
    const int64_t nb = (li->size + KNN_LANES - 1) / KNN_LANES, bb = s->block_bytes;
    for (int64_t b = 0; b < nb; b += 2) {
        const uint8_t *x0 = codes + b * bb, *x1 = b + 1 < nb ? x0 + bb : x0;
        __m512 s0[KNN_GROUP], s1[KNN_GROUP];
        pair_multi(s, qv, G, width, x0, x1, s0, s1);
        for (int h = 0; h < 2 && b + h < nb; h++) {
            const int64_t valid = li->size - (b + h) * KNN_LANES;
            const uint32_t lanes = valid < KNN_LANES ? (1u << valid) - 1u : 0xffffu;
            take_above(G, h ? s1 : s0, thr, lanes, ids + (b + h) * KNN_LANES, t, stats);
        }
    }
}

/* tile_multi with G (1 .. KNN_GROUP) and the width as constants. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void tile_group(const knn_store *s, const knn_seg *li,
                                                                          const float *const *qv, int G,
                                                                          knn_topk *const *t, int64_t *stats) {
#define KNN_CALL(n)                                \
    if (s->width == 2)                             \
        tile_multi(s, li, qv, n, 2, t, stats);     \
    else                                           \
        tile_multi(s, li, qv, n, 1, t, stats)
    KNN_EACH_GROUP_SIZE(G, KNN_CALL);
#undef KNN_CALL
}
#endif

/* ------------------------------------------------------------------ exact search of row-major keys
 * knn_exact() is the exact top-k of the "Flat" index (and of "auto" while the memory is small) without
 * a score matrix: a tile of keys is packed into the blocks of the lists' layout (in their own dtype),
 * then every group of up to KNN_GROUP queries is scored against it by the scan's kernel, which keeps
 * only the scores above each query's threshold of the moment. With k small against the keys, almost
 * no score leaves the registers (a matmul writes every score, and the selection reads it again). */
#define EXACT_TILE 1024 /* keys per packed tile: 400 KiB at d = 100 float32, within L2 */

/* Keys [nk, dim] row-major (elements of s's kind) into the blocks of s's layout at `out` (lanes and
 * elements past them zero). Pairs of bfloat16 and single float32 elements move as 32-bit words. */
static void pack_tile(const knn_store *s, const uint8_t *rows, int64_t nk, uint8_t *out) {
    const int64_t nb = (nk + KNN_LANES - 1) / KNN_LANES, es = elem_size(s->kind);
    memset(out, 0, (size_t)(nb * s->block_bytes));
    if (es * s->width == 4 && s->dim % s->width == 0) {
        const int64_t words = s->dim / s->width; /* == s->rows */
        for (int64_t j = 0; j < nk; j++) {
            const uint32_t *src = (const uint32_t *)(rows + j * s->dim * es);
            uint32_t *dst = (uint32_t *)(out + (j / KNN_LANES) * s->block_bytes) + j % KNN_LANES;
            for (int64_t w = 0; w < words; w++) dst[w * KNN_LANES] = src[w];
        }
        return;
    }
    for (int64_t j = 0; j < nk; j++) {
        const uint8_t *src = rows + j * s->dim * es;
        uint8_t *dst = out + (j / KNN_LANES) * s->block_bytes;
        for (int64_t i = 0; i < s->dim; i++) memcpy(dst + slot(s, j % KNN_LANES, i) * es, src + i * es, (size_t)es);
    }
}

/* Sort s / id [n] by score, largest first; of equal scores the earlier in s first (a stable merge sort:
 * the reservoir holds its candidates in key order, so ties go to the lower id). `tmp_s`, `tmp_id` [n]. */
static void sort_desc_stable(float *s, int32_t *id, int64_t n, float *tmp_s, int32_t *tmp_id) {
    if (n <= 64) { /* the insertion sort of sort_desc is stable */
        sort_desc(s, id, n);
        return;
    }
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            const int64_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi) {
                const int right = s[b] > s[a];
                tmp_s[o] = right ? s[b] : s[a];
                tmp_id[o++] = right ? id[b++] : id[a++];
            }
            while (a < mid) tmp_s[o] = s[a], tmp_id[o++] = id[a++];
            while (b < hi) tmp_s[o] = s[b], tmp_id[o++] = id[b++];
        }
        memcpy(s, tmp_s, (size_t)n * sizeof(float));
        memcpy(id, tmp_id, (size_t)n * sizeof(int32_t));
    }
}

/* The exact top-k by inner product of each of the m queries q [m, dim] float32 over the keys of
 * `nchunks` chunks (chunk c: keys starts[c] .. starts[c + 1] - 1, [starts[c + 1] - starts[c], dim]
 * row-major at bases[c], elements of `kind`; the ids are those positions, at most INT32_MAX in all). Scores and ids [m, k] best first; of
 * scores tied at the k-th place, the earliest keys, and equal scores in id order; empty slots -inf / -1.
 * Keys whose score is -inf (or NaN) are never returned. Each score is a float32 sum over the elements,
 * in an order of its own (not a matmul's: the last bits may differ from one).
 * Returns 0, 1 when not done (the CPU lacks AVX-512: the caller scores by matmul), or -1 out of memory. */
int knn_exact(int64_t m, int64_t dim, int64_t kind, const float *q, int64_t nchunks, const uint8_t *const *bases,
              const int64_t *starts, int64_t k, float *out_s, int64_t *out_i) {
#ifdef KNN_X86
    if (knn_isa() != ISA_AVX512) return 1;
    knn_store s = {0};
    s.dim = dim;
    s.kind = kind;
    s.width = kind == KIND_BF16 ? 2 : 1;
    s.rows = (dim + s.width - 1) / s.width;
    s.block_bytes = KNN_LANES * s.rows * s.width * elem_size(kind);
    const int64_t dp = (s.rows * s.width + 31) / 16 * 16, es = elem_size(kind);
    float *qps = (float *)calloc((size_t)(m * dp), sizeof(float));
    knn_topk *tops = (knn_topk *)calloc((size_t)m, sizeof(knn_topk));
    /* one segment of EXACT_TILE keys: the packed codes, then their ids */
    const size_t tile_codes = (size_t)((EXACT_TILE / KNN_LANES) * s.block_bytes);
    uint8_t *tile = (uint8_t *)aligned_alloc(64, tile_codes + EXACT_TILE * sizeof(int32_t));
    int32_t *ids = tile ? (int32_t *)(tile + tile_codes) : NULL;
    int rc = qps && tops && tile ? 0 : -1;
    for (int64_t iq = 0; rc == 0 && iq < m; iq++) {
        memcpy(qps + iq * dp, q + iq * dim, (size_t)dim * sizeof(float));
        rc = topk_new(&tops[iq], k, KNN_LANES);
    }
    int64_t stats[4] = {0};
    const int64_t groups = (m + KNN_GROUP - 1) / KNN_GROUP;
    for (int64_t c = 0; rc == 0 && c < nchunks; c++) {
        const int64_t first = starts[c], count = starts[c + 1] - starts[c];
        for (int64_t t0 = 0; t0 < count; t0 += EXACT_TILE) {
            const int64_t nk = count - t0 < EXACT_TILE ? count - t0 : EXACT_TILE;
            pack_tile(&s, bases[c] + t0 * dim * es, nk, tile);
            for (int64_t j = 0; j < nk; j++) ids[j] = (int32_t)(first + t0 + j);
            const knn_seg li = {tile, (int32_t)nk, EXACT_TILE};
            for (int64_t gi = 0, g0 = 0; gi < groups; gi++) { /* groups of equal size, as scan_shared */
                const int64_t G = (m - g0 + (groups - gi) - 1) / (groups - gi);
                const float *qv[KNN_GROUP];
                knn_topk *t[KNN_GROUP];
                for (int64_t g = 0; g < G; g++) {
                    qv[g] = qps + (g0 + g) * dp;
                    t[g] = &tops[g0 + g];
                }
                tile_group(&s, &li, qv, (int)G, t, stats);
                g0 += G;
            }
        }
    }
    float *tmp_s = rc == 0 ? (float *)malloc((size_t)(3 * k + 64 + KNN_LANES) * sizeof(float)) : NULL;
    int32_t *tmp_id = rc == 0 ? (int32_t *)malloc((size_t)(3 * k + 64 + KNN_LANES) * sizeof(int32_t)) : NULL;
    if (rc == 0 && (!tmp_s || !tmp_id)) rc = -1;
    for (int64_t iq = 0; rc == 0 && iq < m; iq++) {
        knn_topk *t = &tops[iq];
        topk_compact(t);
        sort_desc_stable(t->s, t->id, t->n, tmp_s, tmp_id);
        for (int64_t r = 0; r < k; r++) {
            out_s[iq * k + r] = r < t->n ? t->s[r] : -INFINITY;
            out_i[iq * k + r] = r < t->n ? t->id[r] : -1;
        }
    }
    for (int64_t iq = 0; tops && iq < m; iq++) topk_free(&tops[iq]);
    free(tmp_s);
    free(tmp_id);
    free(tops);
    free(qps);
    free(tile);
    return rc;
#else
    (void)m, (void)dim, (void)kind, (void)q, (void)nchunks, (void)bases, (void)starts, (void)k, (void)out_s,
        (void)out_i;
    return 1;
#endif
}

/* True when one of v [16] is above t: four SSE compares where there is SSE2 (every x86-64; gcc left the
 * plain loop scalar, 16 compares and branches, and the ranking of lists spent a quarter of a search
 * there), the plain loop elsewhere. */
static inline int any_above(const float *v, float t) {
#if defined(KNN_X86) && defined(__SSE2__)
    const __m128 tt = _mm_set1_ps(t);
    const __m128 a = _mm_or_ps(_mm_cmpgt_ps(_mm_loadu_ps(v), tt), _mm_cmpgt_ps(_mm_loadu_ps(v + 4), tt));
    const __m128 b = _mm_or_ps(_mm_cmpgt_ps(_mm_loadu_ps(v + 8), tt), _mm_cmpgt_ps(_mm_loadu_ps(v + 12), tt));
    return _mm_movemask_ps(_mm_or_ps(a, b)) != 0;
#else
    int any = 0;
    for (int j = 0; j < 16; j++) any |= v[j] > t;
    return any;
#endif
}

/* Insert bound v of list l into the kept top rank_s / rank_l [n of cap], sorted (the lower list first on
 * equal bounds); updates n and, once `cap` are kept, the smallest kept. */
static inline void rank_insert(float v, int64_t l, int64_t cap, float *rank_s, int64_t *rank_l, int64_t *n,
                               float *floor) {
    int64_t p = *n < cap ? *n : cap - 1;
    while (p > 0 && rank_s[p - 1] < v) {
        rank_s[p] = rank_s[p - 1];
        rank_l[p] = rank_l[p - 1];
        p--;
    }
    rank_s[p] = v;
    rank_l[p] = l;
    if (*n < cap) (*n)++;
    if (*n == cap) *floor = rank_s[cap - 1];
}

/* The `cap` (<= nlist) largest of bound [nlist], largest first and the lower list first on equal bounds,
 * into rank_s / rank_l [cap]. One pass that keeps the top sorted: once it holds `cap` lists, a run of 16
 * bounds none of which beats the smallest kept is skipped with one vector compare, and a bound that does
 * is inserted (about cap * ln(nlist / cap) insertions in all for bounds in random order). knn_search
 * ranks with the exact top-k of rows instead where that has its AVX-512 path. */
static void rank_lists(const float *bound, int64_t nlist, int64_t cap, float *rank_s, int64_t *rank_l) {
    int64_t n = 0;
    float floor = -INFINITY; /* the smallest kept, once `cap` are kept */
    for (int64_t l0 = 0; l0 < nlist; l0 += 16) {
        const int64_t end = l0 + 16 < nlist ? l0 + 16 : nlist;
        if (n == cap && end - l0 == 16 && !any_above(bound + l0, floor)) continue;
        for (int64_t l = l0; l < end; l++)
            if (n < cap || bound[l] > floor) rank_insert(bound[l], l, cap, rank_s, rank_l, &n, &floor);
    }
}

#define TOPK_MIN_K 8 /* the exact top-k of rows: its AVX-512 path from this k on (see knn_topk_rows) */
int knn_topk_rows(int64_t m, int64_t n, const float *scores, int64_t k, float *out_s, int64_t *out_i);

/* True when one of v [n] is NaN (a loop the compiler vectorises). */
static int any_nan(const float *v, int64_t n) {
    int nan = 0;
    for (int64_t i = 0; i < n; i++) nan |= v[i] != v[i];
    return nan;
}

/* For each query (rows of ranked_l [m, cap], the lists in the order they are scanned), the largest
 * bound [m, nlist] of the lists not scanned before each place: out[j] = the max of the bounds of its
 * lists at places j.. and of every list outside its `cap`. The scan's stop test at place j compares the
 * k-th score with it, so it stays exact when the order is not the bound's own. NULL bound: +inf. */
static int remaining_bounds(int64_t m, int64_t nlist, const float *bound, const int64_t *ranked_l, int64_t cap,
                            float *out) {
    if (!bound) {
        for (int64_t i = 0; i < m * cap; i++) out[i] = INFINITY;
        return 0;
    }
    float *masked = (float *)malloc((size_t)nlist * sizeof(float));
    if (!masked) return -1;
    for (int64_t iq = 0; iq < m; iq++) {
        const float *b = bound + iq * nlist;
        const int64_t *rl = ranked_l + iq * cap;
        memcpy(masked, b, (size_t)nlist * sizeof(float));
        for (int64_t j = 0; j < cap; j++) masked[rl[j]] = -INFINITY;
        float run = -INFINITY; /* the largest bound outside the cap (a loop the compiler vectorises) */
        for (int64_t l = 0; l < nlist; l++) run = masked[l] > run ? masked[l] : run;
        for (int64_t j = cap - 1; j >= 0; j--) {
            const float v = b[rl[j]];
            run = v > run ? v : run;
            out[iq * cap + j] = run;
        }
    }
    free(masked);
    return 0;
}

/* knn_scan with the ranking done here: each query's lists are the `cap` (<= nlist) of largest `rank` in
 * its row of rank [m, nlist], in that order (of equal ones the lower list first), and the stop test uses
 * the largest bound [m, nlist] of the lists not yet scanned (remaining_bounds). NULL rank: the lists
 * are ranked by their bound (the bound of the next list is then the largest left). NULL bound (with a
 * rank): no stop test; the caller gives it only when cap == nprobe, where none is made. */
int knn_search(void *h, int64_t m, const float *q, int64_t k, const float *bound, const float *rank, int64_t cap,
               int64_t nprobe, float *out_s, int64_t *out_i, int64_t *stats) {
    const knn_store *s = (const knn_store *)h;
    const float *order = rank ? rank : bound;
    float *ranked_s = (float *)malloc((size_t)(m * cap) * sizeof(float));
    int64_t *ranked_l = (int64_t *)malloc((size_t)(m * cap) * sizeof(int64_t));
    int rc = -1;
    if (ranked_s && ranked_l) {
        /* the exact top-k of the rows (the same order: largest first, the lower list first on equal
         * bounds) where it has its AVX-512 path: a few compares per bound where rank_lists inserts
         * ~cap * ln(nlist / cap) bounds one by one; not with a NaN, which it does not order */
        rc = 0;
        if (knn_isa() >= ISA_AVX512 && cap >= TOPK_MIN_K && !any_nan(order, m * s->nlist))
            rc = knn_topk_rows(m, s->nlist, order, cap, ranked_s, ranked_l);
        else
            for (int64_t iq = 0; iq < m; iq++)
                rank_lists(order + iq * s->nlist, s->nlist, cap, ranked_s + iq * cap, ranked_l + iq * cap);
        if (rc == 0 && rank) rc = remaining_bounds(m, s->nlist, bound, ranked_l, cap, ranked_s);
        if (rc == 0) rc = scan_all(s, m, q, k, ranked_l, ranked_s, cap, nprobe, out_s, out_i, stats);
    }
    free(ranked_s);
    free(ranked_l);
    return rc;
}

/* ------------------------------------------------------------------ ranking lists by their boxes */

#define DOT_ROWS 6      /* rows of a tile of dot_tile_avx2: 12 sums in registers, enough to keep both FMA units busy */
#define DOT_COLS 32     /* columns of a tile (AVX2: two of 16), and the padding of bt */

/* One tile of dot_rows(): out[r, c] = sum_i xb[r, i] * bt[i, c] for the DOT_ROWS (AVX2) or 1 rows of xb
 * [rows, kk] (the first nr stored) and columns c < nc (<= DOT_COLS) of bt [kk, lp] from its first
 * (zero past the last real column), summed over i in order; out rows are ldo floats apart. */
static void dot_tile_scalar(const float *xb, int64_t kk, const float *bt, int64_t lp, int64_t nc, int64_t nr,
                            float *out, int64_t ldo) {
    for (int64_t r = 0; r < nr; r++) {
        float acc[DOT_COLS] = {0};
        for (int64_t i = 0; i < kk; i++) {
            const float xv = xb[r * kk + i];
            const float *b = bt + i * lp;
            for (int j = 0; j < DOT_COLS; j++) acc[j] += xv * b[j];
        }
        memcpy(out + r * ldo, acc, (size_t)nc * sizeof(float));
    }
}

#ifdef KNN_X86
__attribute__((target("avx2,fma"))) static void dot_tile_avx2(const float *xb, int64_t kk, const float *bt, int64_t lp,
                                                              int64_t nc, int64_t nr, float *out, int64_t ldo) {
    for (int half = 0; half < 2 && 16 * half < nc; half++) {
        const float *bh = bt + 16 * half;
        __m256 acc[DOT_ROWS][2];
        for (int r = 0; r < DOT_ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t i = 0; i < kk; i++) {
            const __m256 b0 = _mm256_loadu_ps(bh + i * lp), b1 = _mm256_loadu_ps(bh + i * lp + 8);
            for (int r = 0; r < DOT_ROWS; r++) {
                const __m256 xv = _mm256_broadcast_ss(xb + r * kk + i);
                acc[r][0] = _mm256_fmadd_ps(xv, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(xv, b1, acc[r][1]);
            }
        }
        /* every row through a local tile (a store of acc[r] with r not known at compile time would keep
         * acc in memory, not in registers), then the rows and columns that are real */
        float tile[DOT_ROWS][16];
        for (int r = 0; r < DOT_ROWS; r++) {
            _mm256_storeu_ps(tile[r], acc[r][0]);
            _mm256_storeu_ps(tile[r] + 8, acc[r][1]);
        }
        const int64_t n = nc - 16 * half < 16 ? nc - 16 * half : 16;
        for (int64_t r = 0; r < nr; r++) memcpy(out + r * ldo + 16 * half, tile[r], (size_t)n * sizeof(float));
    }
}
#endif

#ifdef KNN_X86
/* dot_rows() for one row with AVX2 (a decoded token): the columns of y read where they are, 8 sums at a
 * time, each the same chain of fused multiply-adds over i as in dot_tile_avx2(), so the same bits. A
 * tile would transpose every column of y for a single row. */
__attribute__((target("avx2,fma"))) static void dot_row_avx2(const float *x, int64_t kk, const float *y, int64_t ncol,
                                                             float *out) {
    int64_t c = 0;
    for (; c + 8 <= ncol; c += 8) {
        float acc[8] = {0};
        for (int64_t i = 0; i < kk; i++)
            for (int j = 0; j < 8; j++) acc[j] = fmaf(x[i], y[(c + j) * kk + i], acc[j]);
        memcpy(out + c, acc, sizeof acc);
    }
    for (; c < ncol; c++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < kk; i++) acc = fmaf(x[i], y[c * kk + i], acc);
        out[c] = acc;
    }
}
#endif

/* out [m, ncol] = x [m, kk] times the transpose of y [ncol, kk]: out[r, c] = sum_i x[r, i] * y[c, i], each
 * sum over i in order, in float32 (fused multiply-adds where the CPU has AVX2, the AVX2 kernel on AVX-512
 * CPUs too), the same whatever m. Tiles of
 * DOT_COLS columns outside, rows inside: a tile's columns of y, transposed into an L1-sized buffer (zero
 * past the last column), are read from L1 by every row. Returns 0, or -1 out of memory. */
static int dot_rows(const float *x, int64_t m, int64_t kk, const float *y, int64_t ncol, float *out) {
    const int isa = knn_isa();
#ifdef KNN_X86
    if (isa >= ISA_AVX2 && m == 1) {
        dot_row_avx2(x, kk, y, ncol, out);
        return 0;
    }
#endif
    const int64_t rows = isa >= ISA_AVX2 ? DOT_ROWS : 1;
    const int64_t mp = (m + rows - 1) / rows * rows;
    float *xb = (float *)calloc((size_t)(mp * kk), sizeof(float)); /* x, zero rows to a whole tile */
    float *bt = (float *)malloc((size_t)(kk * DOT_COLS) * sizeof(float));
    if (!xb || !bt) {
        free(xb);
        free(bt);
        return -1;
    }
    memcpy(xb, x, (size_t)(m * kk) * sizeof(float));
    for (int64_t c0 = 0; c0 < ncol; c0 += DOT_COLS) {
        const int64_t nc = ncol - c0 < DOT_COLS ? ncol - c0 : DOT_COLS;
        if (nc < DOT_COLS) memset(bt, 0, (size_t)(kk * DOT_COLS) * sizeof(float));
        for (int64_t c = 0; c < nc; c++)
            for (int64_t i = 0; i < kk; i++) bt[i * DOT_COLS + c] = y[(c0 + c) * kk + i];
        for (int64_t r0 = 0; r0 < m; r0 += rows) {
            const int64_t nr = m - r0 < rows ? m - r0 : rows;
            const float *xr = xb + r0 * kk;
            float *o = out + r0 * ncol + c0;
#ifdef KNN_X86
            if (isa >= ISA_AVX2) /* with AVX-512 too: the same sums, from a kernel tested on hardware */
                dot_tile_avx2(xr, kk, bt, DOT_COLS, nc, nr, o, ncol);
            else
#endif
                dot_tile_scalar(xr, kk, bt, DOT_COLS, nc, nr, o, ncol);
        }
    }
    free(xb);
    free(bt);
    return 0;
}

/* knn_search() with the ranking and the bounds computed here from the lists' boxes, boxes [nlist, 2 dim]
 * (each list's maxima, then minima, of its keys: bounded_ivf.py's bounds). With q+ = max(q, 0) and
 * q- = min(q, 0), a list's bound is [q+, q-] . box: the largest q.k any key in the box can have. Its rank
 * is the bound of the box shrunk about its centre by `shrink` (0 < shrink <= 1), [a q+ + b q-,
 * b q+ + a q-] . box with a = (1 + shrink) / 2, b = (1 - shrink) / 2. shrink == 1: the lists are ranked
 * by their bound. The bounds are computed only where a stop test needs them (cap > nprobe) or they rank.
 * Both are one product of [rows, 2 dim] query rows with the boxes (dot_rows). Returns 0, or -1 out of
 * memory. */
int knn_search_boxes(void *h, int64_t m, const float *q, int64_t k, const float *boxes, double shrink, int64_t cap,
                     int64_t nprobe, float *out_s, int64_t *out_i, int64_t *stats) {
    const knn_store *s = (const knn_store *)h;
    const int64_t d = s->dim, kk = 2 * d, nlist = s->nlist;
    const int by_bound = shrink == 1.0, need_bound = by_bound || cap > nprobe;
    const int64_t nrows = m * (need_bound + !by_bound);
    float *x = (float *)malloc((size_t)(nrows * kk) * sizeof(float));
    float *scores = (float *)malloc((size_t)(nrows * nlist) * sizeof(float));
    int rc = -1;
    if (x && scores) {
        const float a = (float)((1.0 + shrink) / 2.0), b = (float)((1.0 - shrink) / 2.0);
        float *bound_rows = x, *rank_rows = x + (need_bound ? m * kk : 0);
        for (int64_t iq = 0; iq < m; iq++)
            for (int64_t i = 0; i < d; i++) {
                const float v = q[iq * d + i], pos = v > 0.0f ? v : 0.0f, neg = v < 0.0f ? v : 0.0f;
                if (need_bound) {
                    bound_rows[iq * kk + i] = pos;
                    bound_rows[iq * kk + d + i] = neg;
                }
                if (!by_bound) {
                    rank_rows[iq * kk + i] = a * pos + b * neg;
                    rank_rows[iq * kk + d + i] = b * pos + a * neg;
                }
            }
        rc = dot_rows(x, nrows, kk, boxes, nlist, scores);
        if (rc == 0) {
            const float *bound = need_bound ? scores : NULL;
            const float *rank = by_bound ? NULL : scores + (need_bound ? m * nlist : 0);
            rc = knn_search(h, m, q, k, bound, rank, cap, nprobe, out_s, out_i, stats);
        }
    }
    free(x);
    free(scores);
    return rc;
}

/* ------------------------------------------------------------------ gather of stored rows */

/* Rows of chunked storage by entry id (the memory's values: knn_memory/storage.py).
 * Chunk c holds entries starts[c] .. starts[c + 1] - 1; head h's entry e of it is the `row_bytes`
 * bytes at bases[c] + h * head_strides[c] + (e - starts[c]) * row_bytes. out [heads, m, row_bytes]
 * receives, for each head h and slot i, the row of entry ids[h * m + i], or zeros where that id is
 * outside 0 .. starts[nchunks] - 1 (-1: an empty slot). Chunks are few (their sizes double), so the
 * chunk of an id is found by a linear walk from the last one. */
/* Head h's row of entry e (0 <= e < starts[nchunks]), as above: the walk to its chunk and the offset. */
static inline const uint8_t *row_of(const uint8_t *const *bases, const int64_t *starts, const int64_t *head_strides,
                                    int64_t nchunks, int64_t h, int64_t e, int64_t row_bytes) {
    int64_t c = nchunks - 1;
    while (starts[c] > e) c--;
    return bases[c] + h * head_strides[c] + (e - starts[c]) * row_bytes;
}

void knn_gather(int64_t nchunks, const uint8_t *const *bases, const int64_t *starts, const int64_t *head_strides,
                int64_t heads, int64_t m, const int64_t *ids, int64_t row_bytes, uint8_t *out) {
    const int64_t total = starts[nchunks];
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t i = 0; i < m; i++) {
            const int64_t e = ids[h * m + i];
            uint8_t *dst = out + (h * m + i) * row_bytes;
            if (e < 0 || e >= total) {
                memset(dst, 0, (size_t)row_bytes);
                continue;
            }
            memcpy(dst, row_of(bases, starts, head_strides, nchunks, h, e, row_bytes), (size_t)row_bytes);
        }
    }
}

/* The weighted sum of gathered rows, without gathering them: out [heads, q, dim] float32 receives, for
 * each head h and query i, the sum over j < k of probs[(h * q + i) * k + j] times the row of entry
 * ids[(h * q + i) * k + j] (chunks as knn_gather() reads them; rows of dim elements of `kind`), in
 * order of j, in float32 (fused multiply-adds with AVX-512 or AVX2); an id outside 0 .. starts[nchunks] - 1
 * or a weight of 0 adds nothing. (Attention over top-k hits: the [q, k, dim] values of a window are
 * never materialised.) */
#ifdef KNN_X86
KNN_AVX512 __m512 row16(const uint8_t *row, int64_t kind, __mmask16 live) {
    if (kind == KIND_F32) return _mm512_maskz_loadu_ps(live, row);
    const __m256i h = _mm256_maskz_loadu_epi16(live, row);
    if (kind == KIND_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* One tile of up to 16 * V dims (masks `live`) of one query: the sum in V registers. */
KNN_AVX512 void weighted_tile(const uint8_t *const *bases, const int64_t *starts, const int64_t *head_strides,
                              int64_t nchunks, int64_t h, const int64_t *ids, const float *w, int64_t k,
                              int64_t kind, int64_t row_bytes, int64_t offset, const __mmask16 *live, int V,
                              float *o) {
    const int64_t total = starts[nchunks], size = kind == KIND_F32 ? 4 : 2;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < k; j++) {
        const int64_t e = ids[j];
        if (e < 0 || e >= total || w[j] == 0.0f) continue;
        const uint8_t *row = row_of(bases, starts, head_strides, nchunks, h, e, row_bytes) + offset;
        const __m512 p = _mm512_set1_ps(w[j]);
        for (int v = 0; v < V; v++) acc[v] = _mm512_fmadd_ps(p, row16(row + 16 * v * size, kind, live[v]), acc[v]);
    }
    for (int v = 0; v < V; v++) _mm512_mask_storeu_ps(o + 16 * v, live[v], acc[v]);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void weighted_avx512(
    const uint8_t *const *bases, const int64_t *starts, const int64_t *head_strides, int64_t nchunks, int64_t h,
    const int64_t *ids, const float *w, int64_t k, int64_t dim, int64_t kind, int64_t row_bytes, float *o) {
    const int64_t size = kind == KIND_F32 ? 4 : 2;
    for (int64_t t0 = 0; t0 < dim; t0 += 64) { /* 64 dims at a time, summed in registers */
        const int64_t width = dim - t0 < 64 ? dim - t0 : 64;
        __mmask16 live[4];
        for (int v = 0; v < 4; v++) {
            const int64_t left = width - 16 * v;
            live[v] = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1u) : (__mmask16)0;
        }
        const int64_t at = t0 * size;
        switch ((width + 15) / 16) { /* the register count a constant: the loops unrolled */
        case 1: weighted_tile(bases, starts, head_strides, nchunks, h, ids, w, k, kind, row_bytes, at, live, 1, o + t0); break;
        case 2: weighted_tile(bases, starts, head_strides, nchunks, h, ids, w, k, kind, row_bytes, at, live, 2, o + t0); break;
        case 3: weighted_tile(bases, starts, head_strides, nchunks, h, ids, w, k, kind, row_bytes, at, live, 3, o + t0); break;
        default: weighted_tile(bases, starts, head_strides, nchunks, h, ids, w, k, kind, row_bytes, at, live, 4, o + t0);
        }
    }
}

/* Eight elements of a row as float32 (bfloat16: shifted into the high half; float16: converted). */
KNN_AVX2 __m256 row8(const uint8_t *row, int64_t kind) {
    if (kind == KIND_F32) return _mm256_loadu_ps((const float *)row);
    const __m128i h = _mm_loadu_si128((const __m128i *)row);
    if (kind == KIND_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* One query's weighted sum with AVX2: dims in tiles of up to 32 (four registers; the last < 8 dims of
 * a row one at a time, in the same pass over the hits); every dim is the same chain of fused
 * multiply-adds over j as with AVX-512. */
__attribute__((target("avx2,fma,f16c"))) static void weighted_avx2(
    const uint8_t *const *bases, const int64_t *starts, const int64_t *head_strides, int64_t nchunks, int64_t h,
    const int64_t *ids, const float *w, int64_t k, int64_t dim, int64_t kind, int64_t row_bytes, float *o) {
    const int64_t total = starts[nchunks], size = kind == KIND_F32 ? 4 : 2;
    for (int64_t t0 = 0; t0 < dim; t0 += 32) {
        const int64_t width = dim - t0 < 32 ? dim - t0 : 32;
        const int V = (int)(width / 8), rest = (int)(width % 8);
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        float tail[8] = {0};
        for (int64_t j = 0; j < k; j++) {
            const int64_t e = ids[j];
            if (e < 0 || e >= total || w[j] == 0.0f) continue;
            const uint8_t *row = row_of(bases, starts, head_strides, nchunks, h, e, row_bytes) + t0 * size;
            const __m256 p = _mm256_set1_ps(w[j]);
            switch (V) { /* the register count a constant: the loop unrolled */
            case 4: acc[3] = _mm256_fmadd_ps(p, row8(row + 24 * size, kind), acc[3]); /* fall through */
            case 3: acc[2] = _mm256_fmadd_ps(p, row8(row + 16 * size, kind), acc[2]); /* fall through */
            case 2: acc[1] = _mm256_fmadd_ps(p, row8(row + 8 * size, kind), acc[1]); /* fall through */
            case 1: acc[0] = _mm256_fmadd_ps(p, row8(row, kind), acc[0]); /* fall through */
            default: break;
            }
            for (int t = 0; t < rest; t++) tail[t] = fmaf(w[j], kind_elem(kind, row, 8 * V + t), tail[t]);
        }
        for (int v = 0; v < V; v++) _mm256_storeu_ps(o + t0 + 8 * v, acc[v]);
        memcpy(o + t0 + 8 * V, tail, (size_t)rest * sizeof(float));
    }
}
#endif

/* Ask the cache for every line of the rows that one query of knn_weighted_gather() will read: the
 * rows of a large memory are cache misses, and waiting on them one row at a time left the gather at
 * a fraction of the memory's bandwidth. */
static void prefetch_rows(const uint8_t *const *bases, const int64_t *starts, const int64_t *head_strides,
                          int64_t nchunks, int64_t h, const int64_t *ids, const float *w, int64_t k,
                          int64_t row_bytes) {
#ifdef KNN_X86
    const int64_t total = starts[nchunks];
    for (int64_t j = 0; j < k; j++) {
        const int64_t e = ids[j];
        if (e < 0 || e >= total || w[j] == 0.0f) continue;
        const uint8_t *row = row_of(bases, starts, head_strides, nchunks, h, e, row_bytes);
        for (int64_t at = 0; at < row_bytes; at += 64) _mm_prefetch((const char *)row + at, _MM_HINT_T0);
        if (row_bytes % 64) _mm_prefetch((const char *)row + row_bytes - 1, _MM_HINT_T0); /* the last line */
    }
#else
    (void)bases, (void)starts, (void)head_strides, (void)nchunks, (void)h, (void)ids, (void)w, (void)k,
        (void)row_bytes;
#endif
}

void knn_weighted_gather(int64_t nchunks, const uint8_t *const *bases, const int64_t *starts,
                         const int64_t *head_strides, int64_t heads, int64_t q, int64_t k, const int64_t *ids,
                         const float *probs, int64_t dim, int64_t kind, float *out) {
    const int64_t total = starts[nchunks], size = kind == KIND_F32 ? 4 : 2, row_bytes = dim * size;
    const int isa = knn_isa();
    if (heads > 0 && q > 0) prefetch_rows(bases, starts, head_strides, nchunks, 0, ids, probs, k, row_bytes);
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t i = 0; i < q; i++) {
            const int64_t *id = ids + (h * q + i) * k;
            const float *w = probs + (h * q + i) * k;
            float *o = out + (h * q + i) * dim;
            if (h * q + i + 1 < heads * q) /* the next query's rows load while this one sums */
                prefetch_rows(bases, starts, head_strides, nchunks, (h * q + i + 1) / q, id + k, w + k, k, row_bytes);
#ifdef KNN_X86
            if (isa >= ISA_AVX512) {
                weighted_avx512(bases, starts, head_strides, nchunks, h, id, w, k, dim, kind, row_bytes, o);
                continue;
            }
            if (isa >= ISA_AVX2) {
                weighted_avx2(bases, starts, head_strides, nchunks, h, id, w, k, dim, kind, row_bytes, o);
                continue;
            }
#endif
            for (int64_t t = 0; t < dim; t++) o[t] = 0.0f;
            for (int64_t j = 0; j < k; j++) {
                const int64_t e = id[j];
                if (e < 0 || e >= total || w[j] == 0.0f) continue;
                const uint8_t *row = row_of(bases, starts, head_strides, nchunks, h, e, row_bytes);
                for (int64_t t = 0; t < dim; t++) o[t] += w[j] * kind_elem(kind, row, t);
            }
        }
    }
    (void)isa;
}

/* ------------------------------------------------------------------ assignment to lists */

#define ASSIGN_KEYS 6   /* keys scored together (each block of centroids is loaded once for all of them; with AVX2, 12 chains of FMAs hide their latency) */
#define ASSIGN_LANES 16 /* centroids per block */
#define ASSIGN_KEYS_512 8 /* keys scored together with AVX-512 (32 registers hold their 16 sums) */

/* For ASSIGN_KEYS keys xb [ASSIGN_KEYS, d]: best[kk] / arg[kk], the smallest hn[l] - x.c_l and its l
 * (the first on ties), over the blocks of ct [d, lp] (see knn_assign). */
static void assign_scalar(const float *xb, int64_t d, int64_t lp, const float *ct, const float *hn, int64_t *arg) {
    float best[ASSIGN_KEYS];
    for (int kk = 0; kk < ASSIGN_KEYS; kk++) {
        best[kk] = INFINITY;
        arg[kk] = 0;
    }
    for (int64_t l0 = 0; l0 < lp; l0 += ASSIGN_LANES) {
        float acc[ASSIGN_KEYS][ASSIGN_LANES] = {{0}};
        for (int64_t i = 0; i < d; i++) {
            const float *c = ct + i * lp + l0;
            for (int kk = 0; kk < ASSIGN_KEYS; kk++) {
                const float xv = xb[kk * d + i];
                for (int j = 0; j < ASSIGN_LANES; j++) acc[kk][j] += xv * c[j];
            }
        }
        for (int kk = 0; kk < ASSIGN_KEYS; kk++)
            for (int j = 0; j < ASSIGN_LANES; j++) {
                const float dist = hn[l0 + j] - acc[kk][j];
                if (dist < best[kk]) {
                    best[kk] = dist;
                    arg[kk] = l0 + j;
                }
            }
    }
}

#ifdef KNN_X86
/* The smallest of 8 lanes (value, index) and its index, the smaller index on equal values. */
__attribute__((target("avx2,fma"))) static inline void argmin8(__m256 v, __m256i ix, float *best, int64_t *arg) {
    float vs[8];
    int32_t is[8];
    _mm256_storeu_ps(vs, v);
    _mm256_storeu_si256((__m256i *)is, ix);
    float b = vs[0];
    int32_t a = is[0];
    for (int j = 1; j < 8; j++)
        if (vs[j] < b || (vs[j] == b && is[j] < a)) {
            b = vs[j];
            a = is[j];
        }
    *best = b;
    *arg = a;
}

__attribute__((target("avx2,fma"))) static void assign_avx2(const float *xb, int64_t d, int64_t lp, const float *ct,
                                                            const float *hn, int64_t *arg) {
    __m256 best[ASSIGN_KEYS][2];
    __m256i bix[ASSIGN_KEYS][2];
    for (int kk = 0; kk < ASSIGN_KEYS; kk++)
        for (int h = 0; h < 2; h++) {
            best[kk][h] = _mm256_set1_ps(INFINITY);
            bix[kk][h] = _mm256_setzero_si256();
        }
    const __m256i step = _mm256_set1_epi32(ASSIGN_LANES);
    __m256i ix0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i ix1 = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t l0 = 0; l0 < lp; l0 += ASSIGN_LANES) {
        __m256 acc[ASSIGN_KEYS][2];
        for (int kk = 0; kk < ASSIGN_KEYS; kk++) acc[kk][0] = acc[kk][1] = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i++) {
            const float *c = ct + i * lp + l0;
            const __m256 c0 = _mm256_loadu_ps(c), c1 = _mm256_loadu_ps(c + 8);
            for (int kk = 0; kk < ASSIGN_KEYS; kk++) {
                const __m256 xv = _mm256_broadcast_ss(xb + kk * d + i);
                acc[kk][0] = _mm256_fmadd_ps(xv, c0, acc[kk][0]);
                acc[kk][1] = _mm256_fmadd_ps(xv, c1, acc[kk][1]);
            }
        }
        const __m256 h0 = _mm256_loadu_ps(hn + l0), h1 = _mm256_loadu_ps(hn + l0 + 8);
        for (int kk = 0; kk < ASSIGN_KEYS; kk++) {
            const __m256 d0 = _mm256_sub_ps(h0, acc[kk][0]), d1 = _mm256_sub_ps(h1, acc[kk][1]);
            const __m256 lt0 = _mm256_cmp_ps(d0, best[kk][0], _CMP_LT_OQ);
            const __m256 lt1 = _mm256_cmp_ps(d1, best[kk][1], _CMP_LT_OQ);
            best[kk][0] = _mm256_blendv_ps(best[kk][0], d0, lt0);
            best[kk][1] = _mm256_blendv_ps(best[kk][1], d1, lt1);
            bix[kk][0] = _mm256_castps_si256(
                _mm256_blendv_ps(_mm256_castsi256_ps(bix[kk][0]), _mm256_castsi256_ps(ix0), lt0));
            bix[kk][1] = _mm256_castps_si256(
                _mm256_blendv_ps(_mm256_castsi256_ps(bix[kk][1]), _mm256_castsi256_ps(ix1), lt1));
        }
        ix0 = _mm256_add_epi32(ix0, step);
        ix1 = _mm256_add_epi32(ix1, step);
    }
    for (int kk = 0; kk < ASSIGN_KEYS; kk++) {
        float b0, b1;
        int64_t a0, a1;
        argmin8(best[kk][0], bix[kk][0], &b0, &a0);
        argmin8(best[kk][1], bix[kk][1], &b1, &a1);
        arg[kk] = (b1 < b0 || (b1 == b0 && a1 < a0)) ? a1 : a0;
    }
}
/* assign_avx2 with 16-lane registers, ASSIGN_KEYS_512 keys and two blocks of centroids per step (then a
 * last single block): the same sums in the same order, so the same lists. Twice the keys per pass
 * halve the reads of the centroids (from L2 at a thousand lists and more): 60-74 -> ~100 GFLOP/s. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void assign_avx512(const float *xb, int64_t d, int64_t lp,
                                                                             const float *ct, const float *hn,
                                                                             int64_t *arg) {
    __m512 best[ASSIGN_KEYS_512][2];
    __m512i bix[ASSIGN_KEYS_512][2];
    for (int kk = 0; kk < ASSIGN_KEYS_512; kk++)
        for (int h = 0; h < 2; h++) {
            best[kk][h] = _mm512_set1_ps(INFINITY);
            bix[kk][h] = _mm512_setzero_si512();
        }
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t l0 = 0; l0 < lp; l0 += 2 * ASSIGN_LANES) {
        const int two = l0 + 2 * ASSIGN_LANES <= lp; /* else one last block */
        __m512 acc[ASSIGN_KEYS_512][2];
        for (int kk = 0; kk < ASSIGN_KEYS_512; kk++) acc[kk][0] = acc[kk][1] = _mm512_setzero_ps();
        if (two) {
            for (int64_t i = 0; i < d; i++) {
                const float *c = ct + i * lp + l0;


                const __m512 c0 = _mm512_loadu_ps(c), c1 = _mm512_loadu_ps(c + ASSIGN_LANES);
                for (int kk = 0; kk < ASSIGN_KEYS_512; kk++) {
                    const __m512 xv = _mm512_set1_ps(xb[kk * d + i]);
                    acc[kk][0] = _mm512_fmadd_ps(xv, c0, acc[kk][0]);
                    acc[kk][1] = _mm512_fmadd_ps(xv, c1, acc[kk][1]);
                }
            }
        } else {
            for (int64_t i = 0; i < d; i++) {
                const __m512 c0 = _mm512_loadu_ps(ct + i * lp + l0);
                for (int kk = 0; kk < ASSIGN_KEYS_512; kk++)
                    acc[kk][0] = _mm512_fmadd_ps(_mm512_set1_ps(xb[kk * d + i]), c0, acc[kk][0]);
            }
        }
        for (int h = 0; h < 1 + two; h++) {
            const int64_t at = l0 + h * ASSIGN_LANES;
            const __m512 hv = _mm512_loadu_ps(hn + at);
            const __m512i ix = _mm512_add_epi32(lane, _mm512_set1_epi32((int)at));
            for (int kk = 0; kk < ASSIGN_KEYS_512; kk++) {
                const __m512 dist = _mm512_sub_ps(hv, acc[kk][h]);
                const __mmask16 lt = _mm512_cmp_ps_mask(dist, best[kk][h], _CMP_LT_OQ);
                best[kk][h] = _mm512_mask_mov_ps(best[kk][h], lt, dist);
                bix[kk][h] = _mm512_mask_mov_epi32(bix[kk][h], lt, ix);
            }
        }
    }
    for (int kk = 0; kk < ASSIGN_KEYS_512; kk++) {
        float vs[2 * ASSIGN_LANES];
        int32_t is[2 * ASSIGN_LANES];
        _mm512_storeu_ps(vs, best[kk][0]);
        _mm512_storeu_ps(vs + ASSIGN_LANES, best[kk][1]);
        _mm512_storeu_si512((void *)is, bix[kk][0]);
        _mm512_storeu_si512((void *)(is + ASSIGN_LANES), bix[kk][1]);
        float b = vs[0];
        int32_t a = is[0];
        for (int j = 1; j < 2 * ASSIGN_LANES; j++)
            if (vs[j] < b || (vs[j] == b && is[j] < a)) {
                b = vs[j];
                a = is[j];
            }
        arg[kk] = a;
    }
}
#endif

/* The threads a call over `items` items (heads, parts of keys) asked for `threads` runs on: at most one
 * per item; 1 without OpenMP. */
static int64_t split_threads(int64_t items, int64_t threads) {
#ifdef _OPENMP
    return threads < items ? threads : items;
#else
    (void)items;
    (void)threads;
    return 1;
#endif
}

/* Work over items first .. first + count - 1 of a call (its arguments in `args`): 0, or -1 on failure. */
typedef int (*knn_range_fn)(int64_t first, int64_t count, const void *args);

/* fn over items 0 .. items - 1 cut into `parts` contiguous ranges, one per thread where parts > 1 (the
 * library built with OpenMP: see split_threads()), else in the calling thread. Returns 0, or -1 where
 * some range failed. */
static int run_parts(int64_t items, int64_t parts, knn_range_fn fn, const void *args) {
    if (parts <= 1) return fn(0, items, args);
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)parts) schedule(static, 1) reduction(| : failed)
#endif
    for (int64_t p = 0; p < parts; p++) {
        const int64_t first = items * p / parts, count = items * (p + 1) / parts - first;
        failed |= fn(first, count, args) != 0;
    }
    return failed ? -1 : 0;
}

/* The nearest centroid (L2) of each key of x [n, d]: out[i] = argmin_l half_norms[l] - x_i . c_l (the
 * first on ties). The centroids come transposed, ct [d, lp] with lp a multiple of ASSIGN_LANES, and
 * half_norms [lp] is +inf in the padding columns. Dot products are summed in float32 over i in order
 * (with fused multiply-adds where the CPU has AVX2: a key within rounding of two centroids may go to
 * either, depending on the instruction set). Returns 0, or -1 when out of memory.
 * (knn_assign() below, on one thread.) */
static int assign_range(int64_t n, int64_t d, const float *x, int64_t lp, const float *ct, const float *hn,
                        int64_t *out) {
    float *xb = (float *)calloc((size_t)(ASSIGN_KEYS_512 * d), sizeof(float));
    if (!xb) return -1;
    const int isa = knn_isa();
    const int64_t keys = isa >= ISA_AVX512 ? ASSIGN_KEYS_512 : ASSIGN_KEYS;
    int64_t got[ASSIGN_KEYS_512];
    for (int64_t k0 = 0; k0 < n; k0 += keys) {
        const int64_t nk = n - k0 < keys ? n - k0 : keys;
        memcpy(xb, x + k0 * d, (size_t)(nk * d) * sizeof(float));
        if (nk < keys) memset(xb + nk * d, 0, (size_t)((keys - nk) * d) * sizeof(float));
#ifdef KNN_X86
        if (isa >= ISA_AVX512)
            assign_avx512(xb, d, lp, ct, hn, got);
        else if (isa >= ISA_AVX2)
            assign_avx2(xb, d, lp, ct, hn, got);
        else
#endif
            assign_scalar(xb, d, lp, ct, hn, got);
        (void)isa;
        for (int64_t kk = 0; kk < nk; kk++) out[k0 + kk] = got[kk];
    }
    free(xb);
    return 0;
}

/* Keys per thread below which knn_assign() does not split its keys over threads. */
#define ASSIGN_SPLIT_KEYS 4096

typedef struct {
    int64_t d, lp;
    const float *x, *ct, *hn;
    int64_t *out;
} assign_args;

/* Keys first .. first + count - 1 of knn_assign() (its arguments in a). */
static int assign_keys(int64_t first, int64_t count, const void *args) {
    const assign_args *a = (const assign_args *)args;
    return assign_range(count, a->d, a->x + first * a->d, a->lp, a->ct, a->hn, a->out + first);
}

/* As above, with the keys cut into up to `threads` contiguous parts of at least ASSIGN_SPLIT_KEYS, one per
 * thread, where the library is built with OpenMP: each key's centroid is the same either way. */
int knn_assign(int64_t n, int64_t d, const float *x, int64_t lp, const float *ct, const float *hn, int64_t *out,
               int64_t threads) {
    const assign_args a = {d, lp, x, ct, hn, out};
    return run_parts(n, split_threads(n / ASSIGN_SPLIT_KEYS, threads), assign_keys, &a);
}

/* ------------------------------------------------------------------ every head of a row at once */

typedef struct {
    const int64_t *table;
    int64_t n;
    const float *keys;
    const void *codes;
} add_args;

/* Heads first .. first + count - 1 of knn_add_heads() (its arguments in a), one after the other. */
static int add_heads_range(int64_t first, int64_t count, const void *args) {
    const add_args *a = (const add_args *)args;
    const int64_t n = a->n;
    const knn_store *s = (const knn_store *)(intptr_t)a->table[0];
    const int64_t d = s->dim, code_bytes = n * d * elem_size(s->kind);
    int64_t *lists = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    int64_t *ids = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    int rc = lists && ids ? 0 : -1;
    for (int64_t h = first; h < first + count && !rc; h++) {
        const int64_t *e = a->table + h * 7;
        const float *x = a->keys + h * n * d;
        rc = knn_assign(n, d, x, e[3], (const float *)(intptr_t)e[1], (const float *)(intptr_t)e[2], lists, 1);
        if (rc) break;
        for (int64_t r = 0; r < n; r++) ids[r] = e[6] + r;
        rc = knn_store_add_boxed((void *)(intptr_t)e[0], n, (const uint8_t *)a->codes + h * code_bytes, lists,
                                 ids, x, (float *)(intptr_t)e[4], (int64_t *)(intptr_t)e[5]);
    }
    free(lists);
    free(ids);
    return rc;
}

typedef struct {
    const int64_t *table;
    int64_t m;
    const float *q;
    int64_t k;
    float *out_s;
    int64_t *out_i, *stats;
} search_args;

/* Heads first .. first + count - 1 of knn_search_heads() (its arguments in a), one after the other. */
static int search_heads_range(int64_t first, int64_t count, const void *args) {
    const search_args *a = (const search_args *)args;
    const int64_t m = a->m, k = a->k;
    for (int64_t h = first; h < first + count; h++) {
        const int64_t *e = a->table + h * 5;
        const knn_store *s = (const knn_store *)(intptr_t)e[0];
        double shrink;
        memcpy(&shrink, e + 4, sizeof shrink);
        if (knn_search_boxes((void *)s, m, a->q + h * m * s->dim, k, (const float *)(intptr_t)e[1], shrink, e[2],
                             e[3], a->out_s + h * m * k, a->out_i + h * m * k, a->stats + h * 4))
            return -1;
    }
    return 0;
}

/* Add n keys to each of `heads` stores: keys [heads, n, dim] float32 and codes [heads, n, dim] of the
 * stores' kind (the same keys). Row h of table [heads, 7] is (store, ct, half norms, lp, bounds, counts,
 * first id) of head h, as knn_assign() and knn_store_add_boxed() take them; its keys get ids first id,
 * first id + 1, ... Every store has the same dim and kind. With threads > 1 (built with OpenMP) the heads
 * are cut into that many contiguous groups, one per thread; each head's add is the same as on one thread.
 * Returns 0, or -1 out of memory (other heads may hold their keys). */
int knn_add_heads(int64_t heads, const int64_t *table, int64_t n, const float *keys, const void *codes,
                  int64_t threads) {
    if (heads <= 0 || n <= 0) return 0;
    const add_args a = {table, n, keys, codes};
    return run_parts(heads, split_threads(heads, threads), add_heads_range, &a);
}

/* knn_search_boxes() for each of `heads` stores: queries q [heads, m, dim], results out_s, out_i
 * [heads, m, k] and stats [heads, 4]. Row h of table [heads, 5] is (store, boxes [nlist of that store,
 * 2 dim], cap, nprobe, shrink as the bits of a double) of head h. With threads > 1 (built with OpenMP) the heads are cut into
 * that many contiguous groups, one per thread; each head's search is the same as on one thread. Returns
 * 0, or -1 out of memory. */
int knn_search_heads(int64_t heads, const int64_t *table, int64_t m, const float *q, int64_t k, float *out_s,
                     int64_t *out_i, int64_t *stats, int64_t threads) {
    const search_args a = {table, m, q, k, out_s, out_i, stats};
    return run_parts(heads, split_threads(heads, threads), search_heads_range, &a);
}

/* 1 where this library was built with OpenMP (knn_add_heads() and knn_search_heads() can split their
 * heads over threads, knn_assign() its keys), else 0. */
int knn_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ top-k of score rows */

/* The largest of each run of 16 of r [n] (the last run may be shorter) into mx [ceil(n / 16)]: SSE
 * maxima where there is SSE2 (every x86-64; gcc leaves the plain loop scalar), the plain loop else. */
static void run_maxima(const float *r, int64_t n, float *mx) {
    int64_t j = 0, run = 0;
#if defined(KNN_X86) && defined(__SSE2__)
    for (; j + 16 <= n; j += 16, run++) {
        __m128 a = _mm_max_ps(_mm_loadu_ps(r + j), _mm_loadu_ps(r + j + 4));
        a = _mm_max_ps(a, _mm_max_ps(_mm_loadu_ps(r + j + 8), _mm_loadu_ps(r + j + 12)));
        a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
        mx[run] = _mm_cvtss_f32(a);
    }
#endif
    for (; j < n; j += 16, run++) {
        const int64_t end = j + 16 < n ? j + 16 : n;
        float v = r[j];
        for (int64_t i = j + 1; i < end; i++) v = r[i] > v ? r[i] : v;
        mx[run] = v;
    }
}

/* One row r [n] of scores: its k (1 <= k <= n) largest, best first, into os / oi [k], with the maxima of
 * its runs of 16 (mx, ceil(n / 16)) and candidates (cs / ci, room `room`) as scratch. A row of at least k
 * runs first takes the maxima of its runs: the k-th largest of them, T, is a lower bound of the row's
 * k-th largest (k runs reach T), so only the runs whose maximum reaches T can hold a top-k score, and of
 * those only the scores >= T are kept: about k runs and a little over k candidates, whatever the order
 * of the row. A shorter row is selected whole. */
static void topk_row_runs(const float *r, int64_t n, int64_t k, int64_t room, float *mx, float *cs, int32_t *ci,
                          float *os, int64_t *oi) {
    const int64_t runs = (n + 15) / 16;
    int64_t c = 0;
    if (runs >= k) {
        run_maxima(r, n, mx);
        memcpy(cs, mx, (size_t)runs * sizeof(float));
        select_largest(cs, ci, runs, k); /* ci as scratch: these ids are not read */
        float t = cs[0];
        for (int64_t i = 1; i < k; i++) t = cs[i] < t ? cs[i] : t;
        for (int64_t run = 0; run < runs; run++) {
            if (mx[run] < t) continue;
            const int64_t end = 16 * run + 16 < n ? 16 * run + 16 : n;
            for (int64_t i = 16 * run; i < end; i++) {
                if (c == room) { /* only with many ties at t: keep the k best so far */
                    select_largest(cs, ci, c, k);
                    c = k;
                }
                cs[c] = r[i];
                ci[c] = (int32_t)i;
                c += r[i] >= t;
            }
        }
    } else {
        memcpy(cs, r, (size_t)n * sizeof(float));
        for (int64_t i = 0; i < n; i++) ci[i] = (int32_t)i;
        c = n;
    }
    if (c > k) select_largest(cs, ci, c, k);
    sort_desc(cs, ci, k);
    for (int64_t i = 0; i < k; i++) {
        os[i] = cs[i];
        oi[i] = ci[i];
    }
}

#ifdef KNN_X86
/* The same with AVX-512, for k >= TOPK_MIN_K: the row's maxima over g strided groups (g = 4 k rounded up
 * to a multiple of 16, or in a shorter row its length rounded down to one; at least k), in registers
 * for g = 128; a value t that k to 3 k / 2 of them reach (a lower bound of the k-th largest, as
 * above); the scores >= t compressed out in row order (about 1.2-1.5 k of them for scores in no
 * particular order); and each candidate's place counted by compares: how many beat it, a larger score
 * or an equal one earlier in the row (so the earliest win ties, and none is sorted). More than
 * TOPK_RANKED candidates (many ties) go to the runs above. Measured on one core of this machine kind,
 * 256 rows, k = 32: 0.04, 0.07 and 0.12 ms for rows of 64, 256 and 1024 scores, against 0.17, 0.28 and
 * 0.44 ms by the runs alone. */
#define TOPK_RANKED 256
#define KNN_512 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* acc [g] (g a multiple of 16, g <= n) = the maxima of the strided groups of r [n]: acc[j] = max of
 * r[j], r[j + g], r[j + 2 g], ... (vertical maxima, no horizontal step). */
KNN_512 static void group_maxima512(const float *r, int64_t n, int64_t g, float *acc) {
    if (g == 128) { /* k = 32, the attention's usual k: eight registers */
        __m512 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm512_loadu_ps(r + 16 * j);
        int64_t base = 128;
        for (; base + 128 <= n; base += 128)
            for (int j = 0; j < 8; j++) a[j] = _mm512_max_ps(a[j], _mm512_loadu_ps(r + base + 16 * j));
        for (int j = 0; base + 16 * j < n; j++) {
            const int64_t left = n - base - 16 * j;
            const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
            a[j] = _mm512_mask_max_ps(a[j], live, a[j], _mm512_maskz_loadu_ps(live, r + base + 16 * j));
        }
        for (int j = 0; j < 8; j++) _mm512_storeu_ps(acc + 16 * j, a[j]);
        return;
    }
    for (int64_t j = 0; j < g; j += 16) _mm512_storeu_ps(acc + j, _mm512_loadu_ps(r + j));
    for (int64_t base = g; base < n; base += g)
        for (int64_t j = 0; j < g && base + j < n; j += 16) {
            const int64_t left = n - base - j;
            const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
            const __m512 v = _mm512_loadu_ps(acc + j);
            _mm512_storeu_ps(acc + j, _mm512_mask_max_ps(v, live, v, _mm512_maskz_loadu_ps(live, r + base + j)));
        }
}

KNN_512 static inline int64_t count_ge512(const float *s, int64_t g, float t) {
    const __m512 tt = _mm512_set1_ps(t);
    int64_t c = 0;
    for (int64_t j = 0; j < g; j += 16)
        c += __builtin_popcount((unsigned)_mm512_cmp_ps_mask(_mm512_loadu_ps(s + j), tt, _CMP_GE_OQ));
    return c;
}

/* A value t that at least k of acc [g] (k <= g, g a multiple of 16) reach, and few more: bisection over
 * the float order, stopped once k to k + k / 2 of them reach it. The first value tried is `hint` (the
 * previous row's t: the rows of one search are queries of one head, whose scores are alike) when it
 * lies within acc's range; any t that k of them reach gives the same selection. */
KNN_512 static float group_bound512(const float *acc, int64_t g, int64_t k, float hint) {
    __m512 lo_v = _mm512_loadu_ps(acc), hi_v = lo_v;
    for (int64_t j = 16; j < g; j += 16) {
        const __m512 v = _mm512_loadu_ps(acc + j);
        lo_v = _mm512_min_ps(lo_v, v);
        hi_v = _mm512_max_ps(hi_v, v);
    }
    uint32_t lo = order_key(_mm512_reduce_min_ps(lo_v)), hi = order_key(_mm512_reduce_max_ps(hi_v));
    const int64_t enough = k + k / 2;
    uint32_t mid = order_key(hint);
    if (hint != hint || mid <= lo || mid > hi) mid = lo + (hi - lo + 1) / 2;
    while (lo < hi) {
        const int64_t c = count_ge512(acc, g, order_value(mid));
        if (c >= k) {
            lo = mid;
            if (c <= enough) break;
        } else {
            hi = mid - 1;
        }
        mid = lo + (hi - lo + 1) / 2;
    }
    return order_value(lo);
}

/* The scores of r [n] at or above t with their positions, in row order, into cs / ci (room for
 * n + 16); returns how many. Only the positions are compressed (the compress instruction is what
 * this loop waits on), four vectors a step, so that the popcounts that place each one's positions do
 * not wait on each other, and a step without a candidate is skipped; the scores are then read back. */
KNN_512 static int64_t at_or_above512(const float *r, int64_t n, float t, float *cs, int32_t *ci) {
    const __m512 tt = _mm512_set1_ps(t);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t c = 0, i = 0;
    for (; i + 64 <= n; i += 64) {
        __mmask16 m[4];
        for (int u = 0; u < 4; u++) m[u] = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + i + 16 * u), tt, _CMP_GE_OQ);
        if (!(m[0] | m[1] | m[2] | m[3])) continue;
        for (int u = 0; u < 4; u++) {
            const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)(i + 16 * u)));
            _mm512_storeu_si512((void *)(ci + c), _mm512_maskz_compress_epi32(m[u], idx));
            c += __builtin_popcount((unsigned)m[u]);
        }
    }
    for (; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        const __mmask16 m = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, r + i), tt, _CMP_GE_OQ);
        const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)i));
        _mm512_storeu_si512((void *)(ci + c), _mm512_maskz_compress_epi32(m, idx));
        c += __builtin_popcount((unsigned)m);
    }
    for (int64_t j = 0; j < c; j++) cs[j] = r[ci[j]];
    return c;
}

/* The k best of the candidates cs / ci [c] (k <= c <= TOPK_RANKED, in row order), best first, into
 * os / oi: each one's place is how many beat it, counted for 16 candidates at a time against every
 * candidate in turn (one compare each, two within the same 16, where earlier ones win ties). */
KNN_512 static void place512(const float *cs, const int32_t *ci, int64_t c, int64_t k, float *os, int64_t *oi) {
    const __m512i one = _mm512_set1_epi32(1);
    int32_t place[TOPK_RANKED + 16];
    for (int64_t v = 0; v < (c + 15) / 16; v++) {
        const __m512 x = _mm512_loadu_ps(cs + 16 * v); /* lanes past c: not read back */
        const int64_t first = 16 * v, last = first + 16 < c ? first + 16 : c;
        __m512i count = _mm512_setzero_si512();
        for (int64_t j = 0; j < first; j++) /* earlier in the row: beats x when at least as large */
            count = _mm512_mask_add_epi32(count, _mm512_cmp_ps_mask(_mm512_set1_ps(cs[j]), x, _CMP_GE_OQ), count, one);
        for (int64_t j = first; j < last; j++) {
            const __m512 t = _mm512_set1_ps(cs[j]);
            const __mmask16 beaten = _mm512_cmp_ps_mask(t, x, _CMP_GT_OQ) |
                                     (_mm512_cmp_ps_mask(t, x, _CMP_EQ_OQ) & (__mmask16)(0xfffe << (j - first)));
            count = _mm512_mask_add_epi32(count, beaten, count, one);
        }
        for (int64_t j = last; j < c; j++) /* later in the row: beats x when larger */
            count = _mm512_mask_add_epi32(count, _mm512_cmp_ps_mask(_mm512_set1_ps(cs[j]), x, _CMP_GT_OQ), count, one);
        _mm512_storeu_si512((void *)(place + first), count);
    }
    for (int64_t i = 0; i < c; i++) {
        if (place[i] < k) {
            os[place[i]] = cs[i];
            oi[place[i]] = ci[i];
        }
    }
}
#endif

/* Per row of scores [m, n] its k (1 <= k <= n) largest, best first, into out_s / out_i [m, k]: by
 * group maxima and counted places where the CPU has AVX-512 (and k and n suit them), by the maxima of
 * runs otherwise (both above). Of several scores equal at the k-th place the earliest are kept. No NaN.
 * Returns 0, or -1 when out of memory. */
int knn_topk_rows(int64_t m, int64_t n, const float *scores, int64_t k, float *out_s, int64_t *out_i) {
    const int64_t runs = (n + 15) / 16, room = n > 16 * k ? 16 * k + n % 16 + 16 : n;
    int64_t g = ((4 * k + 15) / 16) * 16; /* groups: 4 k, or as many as the row has of 16 (at least k) */
    if (g > n) g = (n / 16) * 16;
    int64_t cap = room > runs ? room : runs;
    int wide = 0;
    float bound = NAN; /* the previous row's */
#ifdef KNN_X86
    wide = knn_isa() >= ISA_AVX512 && k >= TOPK_MIN_K && g >= k && g > 0;
    if (wide) cap = n + 16 > cap ? n + 16 : cap;
#endif
    float *mx = (float *)malloc((size_t)(runs > g ? runs : g) * sizeof(float));
    float *cs = (float *)malloc((size_t)cap * sizeof(float));
    int32_t *ci = (int32_t *)malloc((size_t)cap * sizeof(int32_t));
    if (!mx || !cs || !ci) {
        free(mx), free(cs), free(ci);
        return -1;
    }
    for (int64_t row = 0; row < m; row++) {
        const float *r = scores + row * n;
        float *os = out_s + row * k;
        int64_t *oi = out_i + row * k;
#ifdef KNN_X86
        if (wide) {
            group_maxima512(r, n, g, mx);
            bound = group_bound512(mx, g, k, bound);
            const int64_t c = at_or_above512(r, n, bound, cs, ci);
            if (c <= TOPK_RANKED) {
                place512(cs, ci, c, k, os, oi);
                continue;
            }
        }
#endif
        topk_row_runs(r, n, k, room, mx, cs, ci, os, oi);
    }
    free(mx), free(cs), free(ci);
    return 0;
}
