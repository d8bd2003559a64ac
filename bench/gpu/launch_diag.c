// Which function a cuGetProcAddress_v2 pointer for cuLaunchKernel is, and a backtrace if calling it crashes.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>
static void on_segv(int s) { void *b[64]; int n = backtrace(b, 64); fprintf(stderr, "signal %d, backtrace:\n", s); backtrace_symbols_fd(b, n, 2); _exit(139); }
static void where(const char *what, void *p) { Dl_info i; if (dladdr(p, &i)) printf("%s = %p: %s in %s\n", what, p, i.dli_sname ? i.dli_sname : "?", i.dli_fname); else printf("%s = %p: ?\n", what, p); }
int main(void) {
  signal(SIGSEGV, on_segv);
  void *h = dlopen("libcuda.so.1", RTLD_NOW);
  int (*init)(unsigned) = dlsym(h, "cuInit");
  int (*gpa)(const char *, void **, int, uint64_t, int *) = dlsym(h, "cuGetProcAddress_v2");
  int (*retain)(void **, int) = dlsym(h, "cuDevicePrimaryCtxRetain");
  int (*setcur)(void *) = dlsym(h, "cuCtxSetCurrent");
  where("dlsym cuGetProcAddress_v2", (void *)gpa);
  where("dlsym cuLaunchKernel", dlsym(h, "cuLaunchKernel"));
  init(0);
  int st; void *p = 0; int rc = gpa("cuLaunchKernel", &p, 12000, 0, &st);
  printf("gpa rc=%d status=%d\n", rc, st); where("gpa cuLaunchKernel", p);
  void *ctx; retain(&ctx, 0); setcur(ctx);
  int (*launch)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **) = p;
  fflush(stdout);
  rc = launch((void *)1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0);
  printf("launch of an invalid function: rc=%d\n", rc);
  return 0;
}
