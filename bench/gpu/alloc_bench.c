// cuMemAlloc_v2 + cuMemFree_v2 pairs through the exported symbols (as a program linked to libcuda calls
// them). Prints ns per pair over N pairs after a warm-up. usage: alloc_bench [N] [BYTES]
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 20000;
  size_t bytes = argc > 2 ? (size_t)atol(argv[2]) : (1 << 20);
  void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (!h) { printf("dlopen: %s\n", dlerror()); return 3; }
  int (*init)(unsigned) = dlsym(h, "cuInit");
  int (*retain)(void **, int) = dlsym(h, "cuDevicePrimaryCtxRetain");
  int (*setcur)(void *) = dlsym(h, "cuCtxSetCurrent");
  int (*alloc)(uint64_t *, size_t) = dlsym(h, "cuMemAlloc_v2");
  int (*mfree)(uint64_t) = dlsym(h, "cuMemFree_v2");
  if (init(0)) { printf("cuInit failed\n"); return 3; }
  void *ctx; retain(&ctx, 0); setcur(ctx);
  uint64_t p;
  for (int i = 0; i < 1000; i++) { if (alloc(&p, bytes)) { printf("alloc failed\n"); return 3; } mfree(p); }
  struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; i++) { alloc(&p, bytes); mfree(p); }
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("ns_per_pair %.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
  return 0;
}
