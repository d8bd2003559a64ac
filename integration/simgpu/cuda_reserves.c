/* Device memory taken by other means than an allocation call: context limits, graph memory nodes, module
 * globals, memory pools that keep freed memory.
 *   cuda_reserves [-m dlsym|proc|ptsz] -k heap|stack|fifo|graph|module|library|pool|pool2 [-s MIB]
 * Prints `<kind> reserve rc=R used=U MiB` after taking MIB that way (used: total minus free as cuMemGetInfo
 * reports them, i.e. the slice's charge under the shim), then `<kind> release rc=R used=U MiB` after giving it
 * back (setting the default limit, destroying the graph exec, unloading, trimming the pool). pool2 keeps MIB in
 * one pool, then allocates MIB from a second pool without asking cuMemGetInfo in between and prints
 * `pool2 second rc=R`. */
#include "cuda_common.h"

#include <stdint.h>
#include <unistd.h>

static int (*getinfo)(size_t *, size_t *);

static unsigned long long used_mib(void) {
  size_t f = 0, t = 0;
  getinfo(&f, &t);
  return (unsigned long long)((t - f) >> 20);
}

/* CUmemPoolProps: allocType 1 (pinned), location {device 1, id}. */
struct pool_props {
  int alloc_type, handle_types, loc_type, loc_id;
  void *win32;
  size_t max_size;
  unsigned short usage;
  unsigned char reserved[54];
};
/* CUDA_MEM_ALLOC_NODE_PARAMS. */
struct mem_alloc_node {
  struct pool_props props;
  const void *access;
  size_t access_count;
  size_t bytesize;
  unsigned long long dptr;
};

int main(int argc, char **argv) {
  const char *mode = "proc", *kind = NULL;
  size_t mib = 1024;
  int opt;
  while ((opt = getopt(argc, argv, "m:k:s:")) != -1) {
    switch (opt) {
    case 'm': mode = optarg; break;
    case 'k': kind = optarg; break;
    case 's': mib = (size_t)atol(optarg); break;
    default: return 3;
    }
  }
  if (!kind) return 3;
  cu_open(mode);
  int (*init)(unsigned);
  int (*retain)(void **, int);
  int (*setcur)(void *);
  int (*setlimit)(int, size_t);
  int (*gcreate)(void **, unsigned);
  int (*gaddalloc)(void **, void *, const void *, size_t, void *);
  int (*ginst)(void **, void *, unsigned long long);
  int (*gexecdestroy)(void *);
  int (*modload)(void **, const void *);
  int (*modunload)(void *);
  int (*libload)(void **, const void *, void *, void **, unsigned, void *, void **, unsigned);
  int (*libunload)(void *);
  int (*poolcreate)(void **, const struct pool_props *);
  int (*poolset)(void *, int, void *);
  int (*pooltrim)(void *, size_t);
  int (*poolalloc)(unsigned long long *, size_t, void *, void *);
  int (*freeasync)(unsigned long long, void *);
  CU_SYM(init, "cuInit", cuInit);
  CU_SYM(retain, "cuDevicePrimaryCtxRetain", cuDevicePrimaryCtxRetain);
  CU_SYM(setcur, "cuCtxSetCurrent", cuCtxSetCurrent);
  CU_SYM(getinfo, "cuMemGetInfo", cuMemGetInfo_v2);
  CU_SYM(setlimit, "cuCtxSetLimit", cuCtxSetLimit);
  CU_SYM(gcreate, "cuGraphCreate", cuGraphCreate);
  CU_SYM(gaddalloc, "cuGraphAddMemAllocNode", cuGraphAddMemAllocNode);
  CU_SYM(ginst, "cuGraphInstantiateWithFlags", cuGraphInstantiateWithFlags);
  CU_SYM(gexecdestroy, "cuGraphExecDestroy", cuGraphExecDestroy);
  CU_SYM(modload, "cuModuleLoadData", cuModuleLoadData);
  CU_SYM(modunload, "cuModuleUnload", cuModuleUnload);
  CU_SYM(libload, "cuLibraryLoadData", cuLibraryLoadData);
  CU_SYM(libunload, "cuLibraryUnload", cuLibraryUnload);
  CU_SYM(poolcreate, "cuMemPoolCreate", cuMemPoolCreate);
  CU_SYM(poolset, "cuMemPoolSetAttribute", cuMemPoolSetAttribute);
  CU_SYM(pooltrim, "cuMemPoolTrimTo", cuMemPoolTrimTo);
  if (cu_flags) {
    CU_SYM(poolalloc, "cuMemAllocFromPoolAsync", cuMemAllocFromPoolAsync_ptsz);
    CU_SYM(freeasync, "cuMemFreeAsync", cuMemFreeAsync_ptsz);
  } else {
    CU_SYM(poolalloc, "cuMemAllocFromPoolAsync", cuMemAllocFromPoolAsync);
    CU_SYM(freeasync, "cuMemFreeAsync", cuMemFreeAsync);
  }
  void *ctx;
  int r;
  if ((r = init(0)) || (r = retain(&ctx, 0)) || (r = setcur(ctx))) {
    printf("context failed: rc=%d\n", r);
    return 3;
  }
  size_t bytes = mib << 20;
  int rr = -1;
  printf("%s before used=%llu MiB\n", kind, used_mib());
  if (!strcmp(kind, "heap") || !strcmp(kind, "fifo") || !strcmp(kind, "stack")) {
    int which = !strcmp(kind, "stack") ? 0 : !strcmp(kind, "fifo") ? 1 : 2;
    size_t value = which == 0 ? bytes / (132 * 2048) : bytes;
    size_t dflt = which == 0 ? 1024 : which == 1 ? (1u << 20) : (8u << 20);
    r = setlimit(which, value);
    printf("%s reserve rc=%d used=%llu MiB\n", kind, r, used_mib());
    rr = setlimit(which, dflt);
  } else if (!strcmp(kind, "graph")) {
    void *g, *node, *exec = NULL;
    struct mem_alloc_node p;
    memset(&p, 0, sizeof p);
    p.props.alloc_type = 1;
    p.props.loc_type = 1;
    p.props.loc_id = 0;
    p.bytesize = bytes;
    if ((r = gcreate(&g, 0)) || (r = gaddalloc(&node, g, NULL, 0, &p))) {
      printf("graph setup failed: rc=%d\n", r);
      return 3;
    }
    r = ginst(&exec, g, 0);
    printf("%s reserve rc=%d used=%llu MiB\n", kind, r, used_mib());
    rr = r ? 0 : gexecdestroy(exec);
  } else if (!strcmp(kind, "module") || !strcmp(kind, "library")) {
    char image[128];
    snprintf(image, sizeof image, "vgpu-sim-module globals=%zu", bytes);
    void *h = NULL;
    r = !strcmp(kind, "module") ? modload(&h, image) : libload(&h, image, NULL, NULL, 0, NULL, NULL, 0);
    printf("%s reserve rc=%d used=%llu MiB\n", kind, r, used_mib());
    rr = r ? 0 : !strcmp(kind, "module") ? modunload(h) : libunload(h);
  } else if (!strcmp(kind, "pool") || !strcmp(kind, "pool2")) {
    struct pool_props props;
    memset(&props, 0, sizeof props);
    props.alloc_type = 1;
    props.loc_type = 1;
    void *a, *b;
    unsigned long long keep = ~0ull, p;
    if ((r = poolcreate(&a, &props)) || (r = poolcreate(&b, &props)) || (r = poolset(a, 4, &keep)) ||
        (r = poolalloc(&p, bytes, a, NULL)) || (r = freeasync(p, NULL))) {
      printf("pool setup failed: rc=%d\n", r);
      return 3;
    }
    if (!strcmp(kind, "pool2")) {
      unsigned long long q;
      r = poolalloc(&q, bytes, b, NULL);
      printf("pool2 second rc=%d\n", r);
      if (!r) freeasync(q, NULL);
    }
    printf("%s reserve rc=0 used=%llu MiB\n", kind, used_mib());
    rr = pooltrim(a, 0);
  } else {
    printf("unknown kind %s\n", kind);
    return 3;
  }
  printf("%s release rc=%d used=%llu MiB\n", kind, rr, used_mib());
  return 0;
}
