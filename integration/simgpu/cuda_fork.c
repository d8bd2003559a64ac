/* fork() under the shim: the parent allocates, forks, and the child either uses CUDA itself or exits without it.
 *   cuda_fork [-n PARENT_CHUNKS] [-c CHUNK_MIB] [-x] [-W FILE]
 * Parent: `parent Allocated N MiB`, then fork. Child (without -x): its own cuInit and primary context, chunks
 * until refused (`child Hit the limit after N MiB: rc=R`), `child Holding N MiB`, and with -W it holds until FILE
 * exists (so a test can look at both processes), then exit(). With -x the child prints `child exits without
 * CUDA` and exit()s at once (atexit handlers run, as in any program). The parent waits for the child, prints its
 * cuMemGetInfo view, then allocates chunks until refused: `parent Hit the limit after N MiB: rc=R` (N counts
 * its first chunks too). */
#include "cuda_common.h"

#include <sys/wait.h>
#include <unistd.h>

static int (*init)(unsigned);
static int (*retain)(void **, int);
static int (*setcur)(void *);
static int (*alloc)(unsigned long long *, size_t);
static int (*getinfo)(size_t *, size_t *);

static int context(void) {
  void *ctx;
  int r = init(0);
  if (r || (r = retain(&ctx, 0)) || (r = setcur(ctx))) printf("context failed: rc=%d\n", r);
  return r;
}

/* Allocates chunks until refused; returns how many, with the refusal's rc in *rc. */
static int fill(size_t chunk, int *rc) {
  int n = 0;
  unsigned long long p;
  while ((*rc = alloc(&p, chunk)) == 0) n++;
  return n;
}

int main(int argc, char **argv) {
  int first = 1, chunk_mib = 512, quiet_child = 0, opt;
  const char *wait_file = NULL;
  while ((opt = getopt(argc, argv, "n:c:xW:")) != -1) {
    switch (opt) {
    case 'n': first = atoi(optarg); break;
    case 'c': chunk_mib = atoi(optarg); break;
    case 'x': quiet_child = 1; break;
    case 'W': wait_file = optarg; break;
    default: return 3;
    }
  }
  cu_open("proc");
  CU_SYM(init, "cuInit", cuInit);
  CU_SYM(retain, "cuDevicePrimaryCtxRetain", cuDevicePrimaryCtxRetain);
  CU_SYM(setcur, "cuCtxSetCurrent", cuCtxSetCurrent);
  CU_SYM(alloc, "cuMemAlloc", cuMemAlloc_v2);
  CU_SYM(getinfo, "cuMemGetInfo", cuMemGetInfo_v2);
  if (context()) return 3;
  size_t chunk = (size_t)chunk_mib << 20;
  for (int i = 0; i < first; i++) {
    unsigned long long p;
    int r = alloc(&p, chunk);
    if (r) {
      printf("parent alloc failed: rc=%d\n", r);
      return 3;
    }
  }
  printf("parent Allocated %d MiB\n", first * chunk_mib);
  fflush(stdout);
  pid_t child = fork();
  if (child < 0) {
    perror("fork");
    return 3;
  }
  if (child == 0) {
    if (quiet_child) {
      printf("child exits without CUDA\n");
      fflush(stdout);
      exit(0);
    }
    if (context()) exit(3);
    int rc, n = fill(chunk, &rc);
    printf("child Hit the limit after %d MiB: rc=%d\n", n * chunk_mib, rc);
    printf("child Holding %d MiB\n", n * chunk_mib);
    fflush(stdout);
    for (int i = 0; wait_file && access(wait_file, F_OK) != 0 && i < 60000; i++) usleep(1000);
    exit(0);
  }
  int status = 0;
  waitpid(child, &status, 0);
  printf("child exited status %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
  size_t f = 0, t = 0;
  int r = getinfo(&f, &t);
  printf("parent cuMemGetInfo rc=%d total=%zu MiB free=%zu MiB\n", r, t >> 20, f >> 20);
  int rc, n = fill(chunk, &rc);
  printf("parent Hit the limit after %d MiB: rc=%d\n", (first + n) * chunk_mib, rc);
  fflush(stdout);
  return 0;
}
