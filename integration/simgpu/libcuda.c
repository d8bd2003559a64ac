/* libcuda.so.1 of the simulated GPU: the driver API subset that vgpu's shim and tests use, with the real
 * signatures and exported names. Device memory lives in the shared state (state.c), so processes see each other.
 *
 * Kernel busy time: a kernel launch runs gridDimX microseconds on the device (blockDim, shared memory and the
 * function are ignored); cuGraphLaunch runs (uintptr_t)hGraphExec microseconds (there is no graph API: callers
 * pass the duration as the handle). Each device is one FIFO executor shared by all processes. A launch returns
 * at once, but blocks while its stream has more than 1 s of queued work or 1024 launches pending.
 *
 * Built with -Bsymbolic-functions so that internal references (and cuGetProcAddress's table) bind to these
 * definitions even when a preloaded library interposes the same names, as the real driver's do. */
#define _GNU_SOURCE
#include "sim.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct sim_ctx *CUcontext;
typedef struct sim_stream *CUstream;
typedef struct sim_event *CUevent;
typedef void *CUfunction;
typedef void *CUarray;
typedef void *CUmipmappedArray;
typedef void *CUmemoryPool;
typedef void *CUgraphExec;
typedef struct {
  char bytes[16];
} CUuuid;

enum {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_CONTEXT = 201,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_NOT_READY = 600,
  CUDA_ERROR_NOT_SUPPORTED = 801,
  CUDA_ERROR_UNKNOWN = 999,
};

#define STREAM_RING 1024
#define QUEUE_AHEAD_NS 1000000000ull
#define CTX_MAGIC 0x43545853u
#define STREAM_MAGIC 0x5354524du
#define EVENT_MAGIC 0x4556454eu

struct sim_stream {
  uint32_t magic;
  int dev;
  _Atomic uint64_t tail;
  _Atomic uint64_t n;
  _Atomic uint64_t ring[STREAM_RING];
};

struct sim_ctx {
  uint32_t magic;
  int dev;
  int primary;
  /* cuCtxSetLimit's stack size, printf FIFO and malloc heap (CU_LIMIT_* 0, 1, 2). */
  uint64_t limits[3];
  struct sim_stream legacy;
};

struct sim_event {
  uint32_t magic;
  int recorded;
  uint64_t t;
};

static int g_inited;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static struct sim_ctx *g_primary[SIM_MAX_DEV];
static int g_primary_refs[SIM_MAX_DEV];
static int g_ctx_count[SIM_MAX_DEV];
static __thread struct sim_ctx *t_cur;
static __thread struct sim_stream *t_ptds[SIM_MAX_DEV];

static uint64_t context_bytes(void) {
  const char *v = getenv("VGPU_SIM_CONTEXT_MIB");
  return (v && *v ? strtoull(v, NULL, 10) : 300ull) << 20;
}

/* ---- allocation table (process local: a dead process's table dies with it) ---- */

struct sim_pool;
struct alloc {
  struct alloc *next;
  uint64_t key;
  uint64_t size;
  int dev;
  struct sim_pool *pool;
};
#define ALLOC_BUCKETS 4096
static struct alloc *g_allocs[ALLOC_BUCKETS];
static pthread_mutex_t g_alloc_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t g_next_addr = 0x7f0000000000ull;

static uint64_t fresh_address(uint64_t size) {
  pthread_mutex_lock(&g_alloc_mu);
  uint64_t a = g_next_addr;
  g_next_addr += (size + (2ull << 20) - 1) & ~((2ull << 20) - 1);
  if (size == 0) g_next_addr += 2ull << 20;
  pthread_mutex_unlock(&g_alloc_mu);
  return a;
}

static void table_put_pool(uint64_t key, uint64_t size, int dev, struct sim_pool *pool) {
  struct alloc *a = malloc(sizeof *a);
  a->key = key;
  a->size = size;
  a->dev = dev;
  a->pool = pool;
  pthread_mutex_lock(&g_alloc_mu);
  a->next = g_allocs[(key >> 12) % ALLOC_BUCKETS];
  g_allocs[(key >> 12) % ALLOC_BUCKETS] = a;
  pthread_mutex_unlock(&g_alloc_mu);
}

static void table_put(uint64_t key, uint64_t size, int dev) { table_put_pool(key, size, dev, NULL); }

static int table_take_pool(uint64_t key, uint64_t *size, int *dev, struct sim_pool **pool) {
  pthread_mutex_lock(&g_alloc_mu);
  struct alloc **pp = &g_allocs[(key >> 12) % ALLOC_BUCKETS];
  while (*pp && (*pp)->key != key) pp = &(*pp)->next;
  struct alloc *a = *pp;
  if (a) *pp = a->next;
  pthread_mutex_unlock(&g_alloc_mu);
  if (!a) return 0;
  *size = a->size;
  *dev = a->dev;
  if (pool) *pool = a->pool;
  free(a);
  return 1;
}


static CUresult need_ctx(int *dev) {
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!t_cur) return CUDA_ERROR_INVALID_CONTEXT;
  *dev = t_cur->dev;
  return CUDA_SUCCESS;
}

static CUresult alloc_on(int dev, uint64_t size, unsigned long long *out) {
  if (size == 0) return CUDA_ERROR_INVALID_VALUE;
  if (sim_charge(dev, size)) return CUDA_ERROR_OUT_OF_MEMORY;
  uint64_t a = fresh_address(size);
  table_put(a, size, dev);
  *out = a;
  return CUDA_SUCCESS;
}

static CUresult alloc_cur(uint64_t size, unsigned long long *out) {
  int dev;
  CUresult r = need_ctx(&dev);
  if (r) return r;
  if (!out) return CUDA_ERROR_INVALID_VALUE;
  return alloc_on(dev, size, out);
}

static void pool_free(struct sim_pool *pool, uint64_t size);

static CUresult free_key(uint64_t key) {
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  uint64_t size;
  int dev;
  struct sim_pool *pool;
  if (!table_take_pool(key, &size, &dev, &pool)) return CUDA_ERROR_INVALID_VALUE;
  if (pool)
    pool_free(pool, size);
  else
    sim_uncharge(dev, size);
  return CUDA_SUCCESS;
}

/* ---- init and devices ---- */

SIM_EXPORT CUresult cuInit(unsigned flags) {
  (void)flags;
  if (!sim_state() || sim_ndev() == 0) return CUDA_ERROR_NO_DEVICE;
  if (!sim_self()) return CUDA_ERROR_UNKNOWN;
  g_inited = 1;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDriverGetVersion(int *v) {
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  *v = SIM_CUDA_VERSION;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGetCount(int *n) {
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!n) return CUDA_ERROR_INVALID_VALUE;
  *n = sim_ndev();
  return CUDA_SUCCESS;
}

static CUresult check_dev(CUdevice d) {
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  return d >= 0 && d < sim_ndev() ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

SIM_EXPORT CUresult cuDeviceGet(CUdevice *d, int ordinal) {
  CUresult r = check_dev(ordinal);
  if (r) return r;
  if (!d) return CUDA_ERROR_INVALID_VALUE;
  *d = ordinal;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
  CUresult r = check_dev(d);
  if (r) return r;
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  snprintf(name, (size_t)len, "%s", SIM_NAME);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) {
  CUresult r = check_dev(d);
  if (r) return r;
  if (!u) return CUDA_ERROR_INVALID_VALUE;
  static const unsigned char base[16] = {0x5a, 0x1c, 0, 0, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 0};
  memcpy(u->bytes, base, 16);
  u->bytes[15] = (char)d;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d) { return cuDeviceGetUuid(u, d); }

SIM_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
  CUresult r = check_dev(d);
  if (r) return r;
  if (!bytes) return CUDA_ERROR_INVALID_VALUE;
  *bytes = sim_total_bytes(d);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGetAttribute(int *v, int attrib, CUdevice d) {
  CUresult r = check_dev(d);
  if (r) return r;
  if (!v || attrib <= 0 || attrib > 200) return CUDA_ERROR_INVALID_VALUE;
  switch (attrib) {
  case 1: *v = 1024; break;        /* MAX_THREADS_PER_BLOCK */
  case 8: *v = 49152; break;       /* MAX_SHARED_MEMORY_PER_BLOCK */
  case 10: *v = 32; break;         /* WARP_SIZE */
  case 13: *v = 1980000; break;    /* CLOCK_RATE */
  case 16: *v = 132; break;        /* MULTIPROCESSOR_COUNT */
  case 33: *v = 0x18 + d; break;   /* PCI_BUS_ID */
  case 34: *v = 0; break;          /* PCI_DEVICE_ID */
  case 36: *v = 2619000; break;    /* MEMORY_CLOCK_RATE */
  case 37: *v = 5120; break;       /* GLOBAL_MEMORY_BUS_WIDTH */
  case 38: *v = 52428800; break;   /* L2_CACHE_SIZE */
  case 39: *v = 2048; break;       /* MAX_THREADS_PER_MULTIPROCESSOR */
  case 41: *v = 1; break;          /* UNIFIED_ADDRESSING */
  case 75: *v = 9; break;          /* COMPUTE_CAPABILITY_MAJOR */
  case 76: *v = 0; break;          /* COMPUTE_CAPABILITY_MINOR */
  case 83: *v = 1; break;          /* MANAGED_MEMORY */
  case 89: *v = 1; break;          /* CONCURRENT_MANAGED_ACCESS */
  case 102: *v = 1; break;         /* VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED */
  case 115: *v = 1; break;         /* MEMORY_POOLS_SUPPORTED */
  default: *v = 0;
  }
  return CUDA_SUCCESS;
}

/* ---- contexts ---- */

static struct sim_ctx *new_ctx(int dev, int primary) {
  struct sim_ctx *c = calloc(1, sizeof *c);
  c->magic = CTX_MAGIC;
  c->dev = dev;
  c->primary = primary;
  c->limits[0] = 1024;
  c->limits[1] = 1ull << 20;
  c->limits[2] = 8ull << 20;
  c->legacy.magic = STREAM_MAGIC;
  c->legacy.dev = dev;
  return c;
}

/* The first context of a process on a device costs context memory, as on the real card; the last one gone
 * gives it back. Called with g_mu held. */
static CUresult ctx_up(int dev) {
  if (g_ctx_count[dev] == 0 && sim_charge(dev, context_bytes())) return CUDA_ERROR_OUT_OF_MEMORY;
  g_ctx_count[dev]++;
  return CUDA_SUCCESS;
}

static void ctx_down(int dev) {
  if (g_ctx_count[dev] > 0 && --g_ctx_count[dev] == 0) sim_uncharge(dev, context_bytes());
}

/* ---- context limits: the stack (per resident thread), printf FIFO and malloc heap are device memory ---- */

#define SIM_RESIDENT_THREADS (132ull * 2048ull)
static uint64_t limit_bytes(int which, uint64_t v) { return which == 0 ? v * SIM_RESIDENT_THREADS : v; }
static const uint64_t g_limit_default[3] = {1024, 1ull << 20, 8ull << 20};

/* What the context's limits hold beyond the defaults (which are inside the context's own memory). */
static uint64_t limits_growth(struct sim_ctx *c) {
  uint64_t sum = 0;
  for (int i = 0; i < 3; i++) {
    uint64_t a = limit_bytes(i, c->limits[i]), b = limit_bytes(i, g_limit_default[i]);
    if (a > b) sum += a - b;
  }
  return sum;
}

static void ctx_limits_down(struct sim_ctx *c) {
  sim_uncharge(c->dev, limits_growth(c));
  for (int i = 0; i < 3; i++) c->limits[i] = g_limit_default[i];
}

SIM_EXPORT CUresult cuCtxSetLimit(int limit, size_t value) {
  int dev;
  CUresult r = need_ctx(&dev);
  if (r) return r;
  if (limit < 0 || limit > 2) return limit <= 8 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
  struct sim_ctx *c = t_cur;
  uint64_t before = limits_growth(c), old = c->limits[limit];
  c->limits[limit] = value;
  uint64_t after = limits_growth(c);
  if (after > before && sim_charge(dev, after - before)) {
    c->limits[limit] = old;
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  if (before > after) sim_uncharge(dev, before - after);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxGetLimit(size_t *value, int limit) {
  int dev;
  CUresult r = need_ctx(&dev);
  if (r) return r;
  if (!value || limit < 0 || limit > 8) return CUDA_ERROR_INVALID_VALUE;
  *value = limit <= 2 ? t_cur->limits[limit] : 0;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice d) {
  CUresult r = check_dev(d);
  if (r) return r;
  if (!pctx) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&g_mu);
  if (g_primary_refs[d] == 0) {
    r = ctx_up(d);
    if (r) {
      pthread_mutex_unlock(&g_mu);
      return r;
    }
    if (!g_primary[d]) g_primary[d] = new_ctx(d, 1);
  }
  g_primary_refs[d]++;
  *pctx = g_primary[d];
  pthread_mutex_unlock(&g_mu);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
  CUresult r = check_dev(d);
  if (r) return r;
  pthread_mutex_lock(&g_mu);
  if (g_primary_refs[d] > 0 && --g_primary_refs[d] == 0) {
    ctx_limits_down(g_primary[d]);
    ctx_down(d);
  }
  pthread_mutex_unlock(&g_mu);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned flags, CUdevice d) {
  (void)flags;
  CUresult r = check_dev(d);
  if (r) return r;
  if (!pctx) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&g_mu);
  r = ctx_up(d);
  pthread_mutex_unlock(&g_mu);
  if (r) return r;
  *pctx = new_ctx(d, 0);
  t_cur = *pctx;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxDestroy_v2(CUcontext c) {
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!c || c->magic != CTX_MAGIC || c->primary) return CUDA_ERROR_INVALID_CONTEXT;
  if (t_cur == c) t_cur = NULL;
  pthread_mutex_lock(&g_mu);
  ctx_limits_down(c);
  ctx_down(c->dev);
  pthread_mutex_unlock(&g_mu);
  c->magic = 0;
  free(c);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxSetCurrent(CUcontext c) {
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (c && c->magic != CTX_MAGIC) return CUDA_ERROR_INVALID_CONTEXT;
  t_cur = c;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxGetCurrent(CUcontext *pc) {
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!pc) return CUDA_ERROR_INVALID_VALUE;
  *pc = t_cur;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxGetDevice(CUdevice *d) {
  int dev;
  CUresult r = need_ctx(&dev);
  if (r) return r;
  if (!d) return CUDA_ERROR_INVALID_VALUE;
  *d = dev;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxSynchronize(void) {
  int dev;
  CUresult r = need_ctx(&dev);
  if (r) return r;
  struct sim_proc *p = sim_self();
  if (p) sim_sleep_until(atomic_load(&p->tail_ns[dev]));
  return CUDA_SUCCESS;
}

/* ---- memory ---- */

SIM_EXPORT CUresult cuMemGetInfo_v2(size_t *freeb, size_t *total) {
  int dev;
  CUresult r = need_ctx(&dev);
  if (r) return r;
  if (!freeb || !total) return CUDA_ERROR_INVALID_VALUE;
  sim_reap();
  uint64_t t = sim_total_bytes(dev), u = sim_used_bytes(dev);
  *total = t;
  *freeb = u < t ? t - u : 0;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size) { return alloc_cur(size, dptr); }

SIM_EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
                                       unsigned elem) {
  if (!pitch || (elem != 4 && elem != 8 && elem != 16)) return CUDA_ERROR_INVALID_VALUE;
  size_t p = (width + 511) & ~(size_t)511;
  CUresult r = alloc_cur((uint64_t)p * height, dptr);
  if (!r) *pitch = p;
  return r;
}

SIM_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t size, unsigned flags) {
  (void)flags;
  return alloc_cur(size, dptr);
}

SIM_EXPORT CUresult cuMemFree_v2(CUdeviceptr p) { return free_key(p); }

/* ---- memory pools: a pool keeps freed memory reserved up to its release threshold ---- */

#define POOL_MAGIC 0x504f4f4cu
struct sim_pool {
  uint32_t magic;
  int dev;
  uint64_t threshold, reserved, used;
};
static struct sim_pool g_default_pool[SIM_MAX_DEV];
static pthread_mutex_t g_pool_mu = PTHREAD_MUTEX_INITIALIZER;

static struct sim_pool *pool_of(void *h) {
  struct sim_pool *p = h;
  for (int d = 0; d < SIM_MAX_DEV; d++)
    if (p == &g_default_pool[d]) {
      p->magic = POOL_MAGIC;
      p->dev = d;
      return p;
    }
  /* Handles the simulated driver never gave out (tests pass placeholders) allocate outside any pool. */
  if (!p || (uintptr_t)p < 4096 || p->magic != POOL_MAGIC) return NULL;
  return p;
}

/* Keeps at most `keep` bytes reserved beyond what is in use. Called with g_pool_mu held. */
static void pool_trim(struct sim_pool *p, uint64_t keep) {
  uint64_t idle = p->reserved - p->used;
  if (idle > keep) {
    sim_uncharge(p->dev, idle - keep);
    p->reserved -= idle - keep;
  }
}

static CUresult pool_alloc(struct sim_pool *p, uint64_t size, unsigned long long *out) {
  if (size == 0 || !out) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&g_pool_mu);
  uint64_t idle = p->reserved - p->used;
  if (idle < size) {
    if (sim_charge(p->dev, size - idle)) {
      pthread_mutex_unlock(&g_pool_mu);
      return CUDA_ERROR_OUT_OF_MEMORY;
    }
    p->reserved += size - idle;
  }
  p->used += size;
  pthread_mutex_unlock(&g_pool_mu);
  uint64_t a = fresh_address(size);
  table_put_pool(a, size, p->dev, p);
  *out = a;
  return CUDA_SUCCESS;
}

/* The free takes effect at once (no stream ordering modelled); what passes the threshold goes back. */
static void pool_free(struct sim_pool *p, uint64_t size) {
  pthread_mutex_lock(&g_pool_mu);
  p->used -= size < p->used ? size : p->used;
  pool_trim(p, p->threshold);
  pthread_mutex_unlock(&g_pool_mu);
}

SIM_EXPORT CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool, CUdevice d) {
  CUresult r = check_dev(d);
  if (r) return r;
  if (!pool) return CUDA_ERROR_INVALID_VALUE;
  *pool = pool_of(&g_default_pool[d]);
  return CUDA_SUCCESS;
}
SIM_EXPORT CUresult cuDeviceGetMemPool(CUmemoryPool *pool, CUdevice d) { return cuDeviceGetDefaultMemPool(pool, d); }

/* CUmemPoolProps: allocType, handleTypes, location {type, id}, win32 attributes, maxSize, ... (88 bytes). */
SIM_EXPORT CUresult cuMemPoolCreate(CUmemoryPool *pool, const void *props) {
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!pool || !props) return CUDA_ERROR_INVALID_VALUE;
  int dev = ((const int *)props)[3];
  if (check_dev(dev)) return CUDA_ERROR_INVALID_DEVICE;
  struct sim_pool *p = calloc(1, sizeof *p);
  p->magic = POOL_MAGIC;
  p->dev = dev;
  *pool = p;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuMemPoolDestroy(CUmemoryPool pool) {
  struct sim_pool *p = pool_of(pool);
  if (!p || p == &g_default_pool[p->dev]) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&g_pool_mu);
  pool_trim(p, 0);
  pthread_mutex_unlock(&g_pool_mu);
  /* Left allocated (and marked dead) while allocations may still name it. */
  p->magic = 0;
  return CUDA_SUCCESS;
}

enum { MEMPOOL_RELEASE_THRESHOLD = 4, MEMPOOL_RESERVED_CURRENT = 5, MEMPOOL_USED_CURRENT = 7 };

SIM_EXPORT CUresult cuMemPoolSetAttribute(CUmemoryPool pool, int attr, void *value) {
  struct sim_pool *p = pool_of(pool);
  if (!p || !value) return CUDA_ERROR_INVALID_VALUE;
  if (attr != MEMPOOL_RELEASE_THRESHOLD) return attr >= 1 && attr <= 8 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&g_pool_mu);
  p->threshold = *(uint64_t *)value;
  pool_trim(p, p->threshold);
  pthread_mutex_unlock(&g_pool_mu);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuMemPoolGetAttribute(CUmemoryPool pool, int attr, void *value) {
  struct sim_pool *p = pool_of(pool);
  if (!p || !value) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&g_pool_mu);
  uint64_t v = attr == MEMPOOL_RELEASE_THRESHOLD ? p->threshold
               : attr == MEMPOOL_RESERVED_CURRENT ? p->reserved
               : attr == MEMPOOL_USED_CURRENT     ? p->used
                                                  : 0;
  pthread_mutex_unlock(&g_pool_mu);
  *(uint64_t *)value = v;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t keep) {
  struct sim_pool *p = pool_of(pool);
  if (!p) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&g_pool_mu);
  pool_trim(p, keep);
  pthread_mutex_unlock(&g_pool_mu);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s) {
  (void)s;
  int dev;
  CUresult r = need_ctx(&dev);
  if (r) return r;
  return pool_alloc(pool_of(&g_default_pool[dev]), size, dptr);
}
SIM_EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s) {
  return cuMemAllocAsync(dptr, size, s);
}
SIM_EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s) {
  (void)s;
  struct sim_pool *p = pool_of(pool);
  if (!p) return alloc_cur(size, dptr);
  return pool_alloc(p, size, dptr);
}
SIM_EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s) {
  return cuMemAllocFromPoolAsync(dptr, size, pool, s);
}
/* Memory is returned at once rather than when the stream reaches the free; a pool keeps what its release
 * threshold allows. */
SIM_EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
  (void)s;
  return free_key(p);
}
SIM_EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr p, CUstream s) { return cuMemFreeAsync(p, s); }

/* CUmemAllocationProp: type, requestedHandleTypes, then CUmemLocation {type, id}. */
struct mem_prop {
  int type;
  int handle_types;
  int loc_type;
  int loc_id;
};

SIM_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const void *prop,
                                unsigned long long flags) {
  (void)flags;
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!h || !prop) return CUDA_ERROR_INVALID_VALUE;
  int dev = ((const struct mem_prop *)prop)->loc_id;
  if (check_dev(dev)) return CUDA_ERROR_INVALID_DEVICE;
  return alloc_on(dev, size, h);
}

SIM_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle h) { return free_key(h); }

SIM_EXPORT CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t align, CUdeviceptr addr,
                                        unsigned long long flags) {
  (void)align;
  (void)addr;
  (void)flags;
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!ptr || !size) return CUDA_ERROR_INVALID_VALUE;
  *ptr = fresh_address(size);
  return CUDA_SUCCESS;
}
SIM_EXPORT CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
  (void)ptr;
  (void)size;
  return g_inited ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}
SIM_EXPORT CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                             unsigned long long flags) {
  (void)ptr;
  (void)size;
  (void)offset;
  (void)h;
  (void)flags;
  return g_inited ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}
SIM_EXPORT CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
  (void)ptr;
  (void)size;
  return g_inited ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}
SIM_EXPORT CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const void *desc, size_t count) {
  (void)ptr;
  (void)size;
  (void)desc;
  (void)count;
  return g_inited ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}
SIM_EXPORT CUresult cuMemGetAllocationGranularity(size_t *g, const void *prop, int option) {
  (void)prop;
  (void)option;
  if (!g) return CUDA_ERROR_INVALID_VALUE;
  *g = 2ull << 20;
  return CUDA_SUCCESS;
}

typedef struct {
  size_t Width, Height;
  int Format;
  unsigned NumChannels;
} CUDA_ARRAY_DESCRIPTOR;
typedef struct {
  size_t Width, Height, Depth;
  int Format;
  unsigned NumChannels;
  unsigned Flags;
} CUDA_ARRAY3D_DESCRIPTOR;

static uint64_t format_bytes(int f) {
  switch (f) {
  case 0x01: case 0x08: return 1; /* UNSIGNED_INT8, SIGNED_INT8 */
  case 0x02: case 0x09: case 0x10: return 2; /* INT16, HALF */
  default: return 4;
  }
}

static uint64_t array_bytes(size_t w, size_t h, size_t d, int fmt, unsigned ch) {
  return (uint64_t)w * (h ? h : 1) * (d ? d : 1) * format_bytes(fmt) * (ch ? ch : 1);
}

static CUresult array_alloc(uint64_t bytes, void **handle) {
  unsigned long long a;
  CUresult r = alloc_cur(bytes, &a);
  if (!r) *handle = (void *)(uintptr_t)a;
  return r;
}

SIM_EXPORT CUresult cuArrayCreate_v2(CUarray *arr, const CUDA_ARRAY_DESCRIPTOR *d) {
  if (!arr || !d) return CUDA_ERROR_INVALID_VALUE;
  return array_alloc(array_bytes(d->Width, d->Height, 1, d->Format, d->NumChannels), arr);
}
SIM_EXPORT CUresult cuArray3DCreate_v2(CUarray *arr, const CUDA_ARRAY3D_DESCRIPTOR *d) {
  if (!arr || !d) return CUDA_ERROR_INVALID_VALUE;
  return array_alloc(array_bytes(d->Width, d->Height, d->Depth, d->Format, d->NumChannels), arr);
}
SIM_EXPORT CUresult cuArrayDestroy(CUarray arr) { return free_key((uint64_t)(uintptr_t)arr); }
SIM_EXPORT CUresult cuMipmappedArrayCreate(CUmipmappedArray *arr, const CUDA_ARRAY3D_DESCRIPTOR *d,
                                           unsigned levels) {
  if (!arr || !d || !levels) return CUDA_ERROR_INVALID_VALUE;
  uint64_t total = 0;
  size_t w = d->Width, h = d->Height, z = d->Depth;
  for (unsigned l = 0; l < levels; l++) {
    total += array_bytes(w, h, z, d->Format, d->NumChannels);
    w = w > 1 ? w / 2 : 1;
    h = h > 1 ? h / 2 : h;
    z = z > 1 ? z / 2 : z;
  }
  return array_alloc(total, arr);
}
SIM_EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray arr) { return free_key((uint64_t)(uintptr_t)arr); }

/* ---- streams, events, launches ---- */

#define CU_STREAM_LEGACY ((CUstream)0x1)
#define CU_STREAM_PER_THREAD ((CUstream)0x2)

static struct sim_stream *resolve_stream(CUstream s, int per_thread, CUresult *err) {
  int dev;
  if ((*err = need_ctx(&dev))) return NULL;
  if (s == CU_STREAM_PER_THREAD || (s == NULL && per_thread)) {
    if (!t_ptds[dev]) {
      struct sim_stream *n = calloc(1, sizeof *n);
      n->magic = STREAM_MAGIC;
      n->dev = dev;
      t_ptds[dev] = n;
    }
    return t_ptds[dev];
  }
  if (s == NULL || s == CU_STREAM_LEGACY) return &t_cur->legacy;
  if (s->magic != STREAM_MAGIC) {
    *err = CUDA_ERROR_INVALID_HANDLE;
    return NULL;
  }
  return s;
}

SIM_EXPORT CUresult cuStreamCreate(CUstream *ps, unsigned flags) {
  (void)flags;
  int dev;
  CUresult r = need_ctx(&dev);
  if (r) return r;
  if (!ps) return CUDA_ERROR_INVALID_VALUE;
  struct sim_stream *s = calloc(1, sizeof *s);
  s->magic = STREAM_MAGIC;
  s->dev = dev;
  *ps = s;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!s || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD || s->magic != STREAM_MAGIC)
    return CUDA_ERROR_INVALID_HANDLE;
  /* Work already queued still runs on the device; only the handle goes. */
  s->magic = 0;
  free(s);
  return CUDA_SUCCESS;
}

static CUresult stream_sync(CUstream h, int per_thread) {
  CUresult r;
  struct sim_stream *s = resolve_stream(h, per_thread, &r);
  if (!s) return r;
  sim_sleep_until(atomic_load(&s->tail));
  return CUDA_SUCCESS;
}
SIM_EXPORT CUresult cuStreamSynchronize(CUstream h) { return stream_sync(h, 0); }
SIM_EXPORT CUresult cuStreamSynchronize_ptsz(CUstream h) { return stream_sync(h, 1); }

static CUresult stream_query(CUstream h, int per_thread) {
  CUresult r;
  struct sim_stream *s = resolve_stream(h, per_thread, &r);
  if (!s) return r;
  return sim_now_ns() >= atomic_load(&s->tail) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
SIM_EXPORT CUresult cuStreamQuery(CUstream h) { return stream_query(h, 0); }
SIM_EXPORT CUresult cuStreamQuery_ptsz(CUstream h) { return stream_query(h, 1); }

SIM_EXPORT CUresult cuEventCreate(CUevent *pe, unsigned flags) {
  (void)flags;
  if (!g_inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!pe) return CUDA_ERROR_INVALID_VALUE;
  struct sim_event *e = calloc(1, sizeof *e);
  e->magic = EVENT_MAGIC;
  *pe = e;
  return CUDA_SUCCESS;
}

static CUresult event_record(CUevent e, CUstream h, int per_thread) {
  if (!e || e->magic != EVENT_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
  CUresult r;
  struct sim_stream *s = resolve_stream(h, per_thread, &r);
  if (!s) return r;
  uint64_t now = sim_now_ns(), tail = atomic_load(&s->tail);
  e->t = tail > now ? tail : now;
  e->recorded = 1;
  return CUDA_SUCCESS;
}
SIM_EXPORT CUresult cuEventRecord(CUevent e, CUstream h) { return event_record(e, h, 0); }
SIM_EXPORT CUresult cuEventRecord_ptsz(CUevent e, CUstream h) { return event_record(e, h, 1); }

SIM_EXPORT CUresult cuEventQuery(CUevent e) {
  if (!e || e->magic != EVENT_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
  return !e->recorded || sim_now_ns() >= e->t ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

SIM_EXPORT CUresult cuEventSynchronize(CUevent e) {
  if (!e || e->magic != EVENT_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
  if (e->recorded) sim_sleep_until(e->t);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuEventDestroy_v2(CUevent e) {
  if (!e || e->magic != EVENT_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
  e->magic = 0;
  free(e);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuEventElapsedTime(float *ms, CUevent a, CUevent b) {
  if (!ms) return CUDA_ERROR_INVALID_VALUE;
  if (!a || !b || a->magic != EVENT_MAGIC || b->magic != EVENT_MAGIC || !a->recorded || !b->recorded)
    return CUDA_ERROR_INVALID_HANDLE;
  uint64_t now = sim_now_ns();
  if (now < a->t || now < b->t) return CUDA_ERROR_NOT_READY;
  *ms = (float)(((double)b->t - (double)a->t) / 1e6);
  return CUDA_SUCCESS;
}

/* The launch path: a clock read and a few atomics unless the queue is full. */
static CUresult launch(CUstream h, int per_thread, uint64_t dur_ns) {
  CUresult r;
  struct sim_stream *s = resolve_stream(h, per_thread, &r);
  if (!s) return r;
  struct sim_state *st = sim_state();
  struct sim_dev *dev = &st->dev[s->dev];
  uint64_t now = sim_now_ns();
  uint64_t tail = atomic_load_explicit(&s->tail, memory_order_relaxed);
  if (tail > now + QUEUE_AHEAD_NS) {
    sim_sleep_until(tail - QUEUE_AHEAD_NS);
    now = sim_now_ns();
  }
  uint64_t n = atomic_fetch_add_explicit(&s->n, 1, memory_order_relaxed);
  uint64_t oldest = atomic_load_explicit(&s->ring[n % STREAM_RING], memory_order_relaxed);
  if (oldest > now) {
    sim_sleep_until(oldest);
    now = sim_now_ns();
  }
  tail = atomic_load_explicit(&s->tail, memory_order_relaxed);
  uint64_t start0 = tail > now ? tail : now;
  uint64_t busy = atomic_load_explicit(&dev->busy_until_ns, memory_order_relaxed), start, end;
  do {
    start = busy > start0 ? busy : start0;
    end = start + dur_ns;
  } while (!atomic_compare_exchange_weak_explicit(&dev->busy_until_ns, &busy, end, memory_order_relaxed,
                                                  memory_order_relaxed));
  while (tail < end && !atomic_compare_exchange_weak_explicit(&s->tail, &tail, end, memory_order_release,
                                                              memory_order_relaxed)) {
  }
  atomic_store_explicit(&s->ring[n % STREAM_RING], end, memory_order_relaxed);
  sim_book(s->dev, start, end);
  return CUDA_SUCCESS;
}

static CUresult launch_grid(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            CUstream h, int per_thread) {
  if (!gx || !gy || !gz || !bx || !by || !bz) return CUDA_ERROR_INVALID_VALUE;
  return launch(h, per_thread, (uint64_t)gx * 1000ull);
}

SIM_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                   unsigned bz, unsigned shmem, CUstream h, void **params, void **extra) {
  (void)f;
  (void)shmem;
  (void)params;
  (void)extra;
  return launch_grid(gx, gy, gz, bx, by, bz, h, 0);
}
SIM_EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                        unsigned by, unsigned bz, unsigned shmem, CUstream h, void **params,
                                        void **extra) {
  (void)f;
  (void)shmem;
  (void)params;
  (void)extra;
  return launch_grid(gx, gy, gz, bx, by, bz, h, 1);
}

SIM_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                              unsigned by, unsigned bz, unsigned shmem, CUstream h,
                                              void **params) {
  (void)f;
  (void)shmem;
  (void)params;
  return launch_grid(gx, gy, gz, bx, by, bz, h, 0);
}
SIM_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz,
                                                   unsigned bx, unsigned by, unsigned bz, unsigned shmem,
                                                   CUstream h, void **params) {
  (void)f;
  (void)shmem;
  (void)params;
  return launch_grid(gx, gy, gz, bx, by, bz, h, 1);
}

typedef struct {
  unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
  CUstream hStream;
  void *attrs;
  unsigned numAttrs;
} CUlaunchConfig;

SIM_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *c, CUfunction f, void **params, void **extra) {
  (void)f;
  (void)params;
  (void)extra;
  if (!c) return CUDA_ERROR_INVALID_VALUE;
  return launch_grid(c->gridDimX, c->gridDimY, c->gridDimZ, c->blockDimX, c->blockDimY, c->blockDimZ,
                     c->hStream, 0);
}
SIM_EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *c, CUfunction f, void **params, void **extra) {
  (void)f;
  (void)params;
  (void)extra;
  if (!c) return CUDA_ERROR_INVALID_VALUE;
  return launch_grid(c->gridDimX, c->gridDimY, c->gridDimZ, c->blockDimX, c->blockDimY, c->blockDimZ,
                     c->hStream, 1);
}

static CUresult graph_launch(CUgraphExec g, CUstream h, int per_thread) {
  uintptr_t us = (uintptr_t)g;
  if (!us || us > 10000000) return CUDA_ERROR_INVALID_VALUE;
  return launch(h, per_thread, (uint64_t)us * 1000ull);
}
SIM_EXPORT CUresult cuGraphLaunch(CUgraphExec g, CUstream h) { return graph_launch(g, h, 0); }
SIM_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec g, CUstream h) { return graph_launch(g, h, 1); }

/* ---- graph memory nodes: a graph's allocations are reserved when it is instantiated ---- */

#define GRAPH_MAGIC 0x47525048u
struct sim_graph {
  uint32_t magic;
  uint64_t bytes[SIM_MAX_DEV];
};
/* Instantiated graphs get ids past what cuGraphLaunch takes as microseconds: the simulated launch keeps its
 * convention, so these are not launchable. */
#define EXEC_BASE 0x40000000ull
#define MAX_EXECS 4096
static uint64_t g_exec_bytes[MAX_EXECS][SIM_MAX_DEV];
static int g_exec_live[MAX_EXECS];
static int g_exec_next;

SIM_EXPORT CUresult cuGraphCreate(void **graph, unsigned flags) {
  (void)flags;
  if (!graph) return CUDA_ERROR_INVALID_VALUE;
  struct sim_graph *g = calloc(1, sizeof *g);
  g->magic = GRAPH_MAGIC;
  *graph = g;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuGraphDestroy(void *graph) {
  struct sim_graph *g = graph;
  if (!g || g->magic != GRAPH_MAGIC) return CUDA_ERROR_INVALID_VALUE;
  g->magic = 0;
  free(g);
  return CUDA_SUCCESS;
}

/* CUDA_MEM_ALLOC_NODE_PARAMS: poolProps (88 bytes; location id at byte 12), accessDescs, accessDescCount,
 * bytesize (byte 104), dptr (out, byte 112). */
SIM_EXPORT CUresult cuGraphAddMemAllocNode(void **node, void *graph, const void *deps, size_t ndeps, void *params) {
  (void)deps;
  (void)ndeps;
  struct sim_graph *g = graph;
  if (!node || !params || !g || g->magic != GRAPH_MAGIC) return CUDA_ERROR_INVALID_VALUE;
  int dev = *(const int *)((const char *)params + 12);
  uint64_t bytes = *(const uint64_t *)((const char *)params + 104);
  if (check_dev(dev) || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  g->bytes[dev] += bytes;
  *(uint64_t *)((char *)params + 112) = fresh_address(bytes);
  *node = (void *)(uintptr_t)(g->bytes[dev] | 1);
  return CUDA_SUCCESS;
}

static CUresult instantiate(void **exec, void *graph) {
  struct sim_graph *g = graph;
  if (!exec || !g || g->magic != GRAPH_MAGIC) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&g_mu);
  int id = g_exec_next < MAX_EXECS ? g_exec_next++ : -1;
  pthread_mutex_unlock(&g_mu);
  if (id < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  for (int d = 0; d < SIM_MAX_DEV; d++) {
    if (g->bytes[d] && sim_charge(d, g->bytes[d])) {
      for (int e = 0; e < d; e++) sim_uncharge(e, g->bytes[e]);
      return CUDA_ERROR_OUT_OF_MEMORY;
    }
    g_exec_bytes[id][d] = g->bytes[d];
  }
  g_exec_live[id] = 1;
  *exec = (void *)(uintptr_t)(EXEC_BASE + (uint64_t)id);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuGraphInstantiateWithFlags(void **exec, void *graph, unsigned long long flags) {
  (void)flags;
  return instantiate(exec, graph);
}
SIM_EXPORT CUresult cuGraphInstantiateWithParams(void **exec, void *graph, void *params) {
  (void)params;
  return instantiate(exec, graph);
}
SIM_EXPORT CUresult cuGraphInstantiateWithParams_ptsz(void **exec, void *graph, void *params) {
  return cuGraphInstantiateWithParams(exec, graph, params);
}
SIM_EXPORT CUresult cuGraphInstantiate_v2(void **exec, void *graph, void *err_node, char *log, size_t log_size) {
  (void)err_node;
  (void)log;
  (void)log_size;
  return instantiate(exec, graph);
}

SIM_EXPORT CUresult cuGraphExecDestroy(void *exec) {
  uint64_t id = (uint64_t)(uintptr_t)exec - EXEC_BASE;
  if ((uintptr_t)exec < EXEC_BASE || id >= MAX_EXECS || !g_exec_live[id]) return CUDA_ERROR_INVALID_VALUE;
  g_exec_live[id] = 0;
  for (int d = 0; d < SIM_MAX_DEV; d++) sim_uncharge(d, g_exec_bytes[id][d]);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGraphMemTrim(CUdevice d) { return check_dev(d); }

/* CU_GRAPH_MEM_ATTR_*: what the graphs of this process reserve on d (used = reserved: no reuse modelled). */
SIM_EXPORT CUresult cuDeviceGetGraphMemAttribute(CUdevice d, int attr, void *value) {
  CUresult r = check_dev(d);
  if (r) return r;
  if (!value || attr < 0 || attr > 3) return CUDA_ERROR_INVALID_VALUE;
  uint64_t sum = 0;
  for (int i = 0; i < MAX_EXECS; i++)
    if (g_exec_live[i]) sum += g_exec_bytes[i][d];
  *(uint64_t *)value = sum;
  return CUDA_SUCCESS;
}

/* ---- modules and libraries: an image "vgpu-sim-module globals=N" holds N bytes of globals on the device ---- */

#define MODULE_MAGIC 0x4d4f444cu
struct sim_module {
  uint32_t magic;
  int dev;
  uint64_t bytes;
};

static CUresult load_image(void **out, const char *image) {
  int dev;
  CUresult r = need_ctx(&dev);
  if (r) return r;
  if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
  const char *g = strstr(image, "globals=");
  if (strncmp(image, "vgpu-sim-module", 15) || !g) return CUDA_ERROR_INVALID_VALUE;
  uint64_t bytes = strtoull(g + 8, NULL, 10);
  if (bytes && sim_charge(dev, bytes)) return CUDA_ERROR_OUT_OF_MEMORY;
  struct sim_module *m = calloc(1, sizeof *m);
  m->magic = MODULE_MAGIC;
  m->dev = dev;
  m->bytes = bytes;
  *out = m;
  return CUDA_SUCCESS;
}

static CUresult load_file(void **out, const char *path) {
  if (!path) return CUDA_ERROR_INVALID_VALUE;
  FILE *f = fopen(path, "re");
  if (!f) return CUDA_ERROR_NOT_FOUND;
  char buf[256] = {0};
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  return load_image(out, buf);
}

static CUresult unload(void *h) {
  struct sim_module *m = h;
  if (!m || m->magic != MODULE_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
  sim_uncharge(m->dev, m->bytes);
  m->magic = 0;
  free(m);
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuModuleLoad(void **m, const char *path) { return load_file(m, path); }
SIM_EXPORT CUresult cuModuleLoadData(void **m, const void *image) { return load_image(m, image); }
SIM_EXPORT CUresult cuModuleLoadDataEx(void **m, const void *image, unsigned n, void *opts, void **vals) {
  (void)n;
  (void)opts;
  (void)vals;
  return load_image(m, image);
}
SIM_EXPORT CUresult cuModuleLoadFatBinary(void **m, const void *fatbin) { return load_image(m, fatbin); }
SIM_EXPORT CUresult cuModuleUnload(void *m) { return unload(m); }
SIM_EXPORT CUresult cuLibraryLoadData(void **lib, const void *code, void *jo, void **jv, unsigned nj, void *lo,
                                      void **lv, unsigned nl) {
  (void)jo, (void)jv, (void)nj, (void)lo, (void)lv, (void)nl;
  return load_image(lib, code);
}
SIM_EXPORT CUresult cuLibraryLoadFromFile(void **lib, const char *path, void *jo, void **jv, unsigned nj,
                                          void *lo, void **lv, unsigned nl) {
  (void)jo, (void)jv, (void)nj, (void)lo, (void)lv, (void)nl;
  return load_file(lib, path);
}
SIM_EXPORT CUresult cuLibraryUnload(void *lib) { return unload(lib); }

/* ---- errors ---- */

static const struct {
  int code;
  const char *name, *text;
} g_errors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static int error_index(CUresult e) {
  for (size_t i = 0; i < sizeof g_errors / sizeof g_errors[0]; i++)
    if (g_errors[i].code == e) return (int)i;
  return -1;
}

SIM_EXPORT CUresult cuGetErrorString(CUresult e, const char **s) {
  int i = error_index(e);
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  if (i < 0) {
    *s = NULL;
    return CUDA_ERROR_INVALID_VALUE;
  }
  *s = g_errors[i].text;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuGetErrorName(CUresult e, const char **s) {
  int i = error_index(e);
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  if (i < 0) {
    *s = NULL;
    return CUDA_ERROR_INVALID_VALUE;
  }
  *s = g_errors[i].name;
  return CUDA_SUCCESS;
}

/* ---- cuGetProcAddress ---- */

SIM_EXPORT CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, unsigned long long flags);
SIM_EXPORT CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, unsigned long long flags,
                                        int *status);

/* Base name, lowest CUDA version the entry serves, entry point, and its per-thread-stream form. For one base
 * name the rows go by rising version; a caller gets the last row its version reaches. */
#define E(base, ver, fn) {base, ver, (void *)fn, NULL}
#define P(base, ver, fn) {base, ver, (void *)fn, (void *)fn##_ptsz}
static const struct proc_entry {
  const char *base;
  int ver;
  void *fn, *ptsz;
} g_procs[] = {
    E("cuInit", 2000, cuInit),
    E("cuDriverGetVersion", 2020, cuDriverGetVersion),
    E("cuDeviceGet", 2000, cuDeviceGet),
    E("cuDeviceGetCount", 2000, cuDeviceGetCount),
    E("cuDeviceGetName", 2000, cuDeviceGetName),
    E("cuDeviceGetUuid", 9020, cuDeviceGetUuid),
    E("cuDeviceGetUuid", 11040, cuDeviceGetUuid_v2),
    E("cuDeviceTotalMem", 3020, cuDeviceTotalMem_v2),
    E("cuDeviceGetAttribute", 2000, cuDeviceGetAttribute),
    E("cuDevicePrimaryCtxRetain", 7000, cuDevicePrimaryCtxRetain),
    E("cuDevicePrimaryCtxRelease", 11000, cuDevicePrimaryCtxRelease_v2),
    E("cuCtxCreate", 3020, cuCtxCreate_v2),
    E("cuCtxDestroy", 4000, cuCtxDestroy_v2),
    E("cuCtxSetCurrent", 4000, cuCtxSetCurrent),
    E("cuCtxGetCurrent", 4000, cuCtxGetCurrent),
    E("cuCtxGetDevice", 2000, cuCtxGetDevice),
    E("cuCtxSynchronize", 2000, cuCtxSynchronize),
    E("cuMemGetInfo", 3020, cuMemGetInfo_v2),
    E("cuMemAlloc", 3020, cuMemAlloc_v2),
    E("cuMemAllocPitch", 3020, cuMemAllocPitch_v2),
    E("cuMemAllocManaged", 6000, cuMemAllocManaged),
    P("cuMemAllocAsync", 11020, cuMemAllocAsync),
    P("cuMemAllocFromPoolAsync", 11020, cuMemAllocFromPoolAsync),
    E("cuMemFree", 3020, cuMemFree_v2),
    P("cuMemFreeAsync", 11020, cuMemFreeAsync),
    E("cuMemCreate", 10020, cuMemCreate),
    E("cuMemRelease", 10020, cuMemRelease),
    E("cuMemAddressReserve", 10020, cuMemAddressReserve),
    E("cuMemAddressFree", 10020, cuMemAddressFree),
    E("cuMemMap", 10020, cuMemMap),
    E("cuMemUnmap", 10020, cuMemUnmap),
    E("cuMemSetAccess", 10020, cuMemSetAccess),
    E("cuMemGetAllocationGranularity", 10020, cuMemGetAllocationGranularity),
    E("cuArrayCreate", 3020, cuArrayCreate_v2),
    E("cuArray3DCreate", 3020, cuArray3DCreate_v2),
    E("cuArrayDestroy", 2000, cuArrayDestroy),
    E("cuMipmappedArrayCreate", 5000, cuMipmappedArrayCreate),
    E("cuMipmappedArrayDestroy", 5000, cuMipmappedArrayDestroy),
    E("cuStreamCreate", 2000, cuStreamCreate),
    E("cuStreamDestroy", 4000, cuStreamDestroy_v2),
    P("cuStreamSynchronize", 2000, cuStreamSynchronize),
    P("cuStreamQuery", 2000, cuStreamQuery),
    E("cuEventCreate", 2000, cuEventCreate),
    P("cuEventRecord", 2000, cuEventRecord),
    E("cuEventQuery", 2000, cuEventQuery),
    E("cuEventSynchronize", 2000, cuEventSynchronize),
    E("cuEventDestroy", 4000, cuEventDestroy_v2),
    E("cuEventElapsedTime", 2000, cuEventElapsedTime),
    P("cuLaunchKernel", 4000, cuLaunchKernel),
    P("cuLaunchKernelEx", 11060, cuLaunchKernelEx),
    P("cuLaunchCooperativeKernel", 9000, cuLaunchCooperativeKernel),
    P("cuGraphLaunch", 10000, cuGraphLaunch),
    E("cuCtxSetLimit", 3010, cuCtxSetLimit),
    E("cuCtxGetLimit", 3010, cuCtxGetLimit),
    E("cuDeviceGetDefaultMemPool", 11020, cuDeviceGetDefaultMemPool),
    E("cuDeviceGetMemPool", 11020, cuDeviceGetMemPool),
    E("cuMemPoolCreate", 11020, cuMemPoolCreate),
    E("cuMemPoolDestroy", 11020, cuMemPoolDestroy),
    E("cuMemPoolSetAttribute", 11020, cuMemPoolSetAttribute),
    E("cuMemPoolGetAttribute", 11020, cuMemPoolGetAttribute),
    E("cuMemPoolTrimTo", 11020, cuMemPoolTrimTo),
    E("cuGraphCreate", 10000, cuGraphCreate),
    E("cuGraphDestroy", 10000, cuGraphDestroy),
    E("cuGraphAddMemAllocNode", 11040, cuGraphAddMemAllocNode),
    E("cuGraphInstantiate", 11000, cuGraphInstantiate_v2),
    E("cuGraphInstantiate", 12000, cuGraphInstantiateWithFlags),
    E("cuGraphInstantiateWithFlags", 11040, cuGraphInstantiateWithFlags),
    P("cuGraphInstantiateWithParams", 12000, cuGraphInstantiateWithParams),
    E("cuGraphExecDestroy", 10000, cuGraphExecDestroy),
    E("cuDeviceGraphMemTrim", 11040, cuDeviceGraphMemTrim),
    E("cuDeviceGetGraphMemAttribute", 11040, cuDeviceGetGraphMemAttribute),
    E("cuModuleLoad", 2000, cuModuleLoad),
    E("cuModuleLoadData", 2000, cuModuleLoadData),
    E("cuModuleLoadDataEx", 2010, cuModuleLoadDataEx),
    E("cuModuleLoadFatBinary", 2000, cuModuleLoadFatBinary),
    E("cuModuleUnload", 2000, cuModuleUnload),
    E("cuLibraryLoadData", 12000, cuLibraryLoadData),
    E("cuLibraryLoadFromFile", 12000, cuLibraryLoadFromFile),
    E("cuLibraryUnload", 12000, cuLibraryUnload),
    E("cuGetErrorString", 6000, cuGetErrorString),
    E("cuGetErrorName", 6000, cuGetErrorName),
    E("cuGetProcAddress", 11030, cuGetProcAddress),
    E("cuGetProcAddress", 12000, cuGetProcAddress_v2),
};

enum { CU_GET_PROC_ADDRESS_SUCCESS = 0, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND = 1,
       CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT = 2 };
#define CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM 2ull

SIM_EXPORT CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, unsigned long long flags,
                                        int *status) {
  if (!sym || !pfn) return CUDA_ERROR_INVALID_VALUE;
  const struct proc_entry *best = NULL;
  int known = 0;
  for (size_t i = 0; i < sizeof g_procs / sizeof g_procs[0]; i++) {
    if (strcmp(g_procs[i].base, sym)) continue;
    known = 1;
    if (g_procs[i].ver <= ver) best = &g_procs[i];
  }
  *pfn = NULL;
  if (!best) {
    if (status)
      *status = known ? CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT : CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return CUDA_ERROR_NOT_FOUND;
  }
  *pfn = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) && best->ptsz ? best->ptsz : best->fn;
  if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
  return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, unsigned long long flags) {
  return cuGetProcAddress_v2(sym, pfn, ver, flags, NULL);
}
