/* The lab's OOM loop: allocate chunks (512 MiB) until refused.
 *   cuda_oom [-m dlsym|proc|ptsz] [-n MAX_CHUNKS] [-c CHUNK_MIB] [-d DEVICE] [-i] [-H HOLD_MS] [-W FILE]
 * Prints `Allocated N MiB` per chunk, `Hit the limit after N MiB: rc=R` when refused, with -i the
 * cuMemGetInfo view before and after, and `Holding N MiB` before holding the memory HOLD_MS ms (-1: until
 * killed). With -W it prints `Waiting for FILE` once its context exists and waits for FILE to exist before the
 * first chunk (so a test can act between the two). Built twice: cuda_oom links libcuda (exported symbols); cuda_oom_dl takes -m. */
#include "cuda_common.h"

#include <unistd.h>

int main(int argc, char **argv) {
  const char *mode = "proc";
  int max_chunks = 1 << 20, chunk_mib = 512, dev = 0, info = 0, hold_ms = 0, opt;
  const char *wait_for = NULL;
  while ((opt = getopt(argc, argv, "m:n:c:d:iH:W:")) != -1) {
    switch (opt) {
    case 'm': mode = optarg; break;
    case 'n': max_chunks = atoi(optarg); break;
    case 'c': chunk_mib = atoi(optarg); break;
    case 'd': dev = atoi(optarg); break;
    case 'i': info = 1; break;
    case 'H': hold_ms = atoi(optarg); break;
    case 'W': wait_for = optarg; break;
    default: return 3;
    }
  }
  cu_open(mode);
  int (*init)(unsigned);
  int (*get)(int *, int);
  int (*retain)(void **, int);
  int (*setcur)(void *);
  int (*alloc)(unsigned long long *, size_t);
  int (*getinfo)(size_t *, size_t *);
  CU_SYM(init, "cuInit", cuInit);
  CU_SYM(get, "cuDeviceGet", cuDeviceGet);
  CU_SYM(retain, "cuDevicePrimaryCtxRetain", cuDevicePrimaryCtxRetain);
  CU_SYM(setcur, "cuCtxSetCurrent", cuCtxSetCurrent);
  CU_SYM(alloc, "cuMemAlloc", cuMemAlloc_v2);
  CU_SYM(getinfo, "cuMemGetInfo", cuMemGetInfo_v2);
  int r = init(0);
  if (r) {
    printf("cuInit failed: rc=%d\n", r);
    return 3;
  }
  int d;
  void *ctx;
  if ((r = get(&d, dev)) || (r = retain(&ctx, d)) || (r = setcur(ctx))) {
    printf("context failed: rc=%d\n", r);
    return 3;
  }
  size_t f = 0, t = 0;
  if (info) {
    r = getinfo(&f, &t);
    printf("cuMemGetInfo rc=%d total=%zu MiB free=%zu MiB\n", r, t >> 20, f >> 20);
  }
  if (wait_for) {
    printf("Waiting for %s\n", wait_for);
    fflush(stdout);
    while (access(wait_for, F_OK) != 0) usleep(10000);
  }
  int n = 0;
  r = 0;
  while (n < max_chunks) {
    unsigned long long p;
    r = alloc(&p, (size_t)chunk_mib << 20);
    if (r) break;
    n++;
    printf("Allocated %d MiB\n", n * chunk_mib);
    fflush(stdout);
  }
  if (n < max_chunks) printf("Hit the limit after %d MiB: rc=%d\n", n * chunk_mib, r);
  if (info) {
    r = getinfo(&f, &t);
    printf("cuMemGetInfo rc=%d total=%zu MiB free=%zu MiB\n", r, t >> 20, f >> 20);
  }
  if (hold_ms) {
    printf("Holding %d MiB\n", n * chunk_mib);
    fflush(stdout);
    if (hold_ms < 0)
      for (;;) pause();
    usleep((useconds_t)hold_ms * 1000);
  }
  fflush(stdout);
  return 0;
}
