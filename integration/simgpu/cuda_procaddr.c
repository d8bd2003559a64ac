/* Prints what cuGetProcAddress_v2 answers for each "NAME VERSION FLAGS" argument triple:
 *   `NAME VERSION FLAGS -> SYMBOL rc=R status=S same=Y|N`
 * SYMBOL is the exported name at the returned address (dladdr), and same=Y when that address is what dlsym
 * gives for SYMBOL on the libcuda handle, i.e. the exported entry point. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  void *h = dlopen("libcuda.so.1", RTLD_NOW);
  if (!h) {
    printf("dlopen: %s\n", dlerror());
    return 3;
  }
  int (*gpa)(const char *, void **, int, unsigned long long, int *) = dlsym(h, "cuGetProcAddress_v2");
  for (int i = 1; i + 2 < argc; i += 3) {
    void *p = NULL;
    int st = -1;
    int rc = gpa(argv[i], &p, atoi(argv[i + 1]), strtoull(argv[i + 2], NULL, 0), &st);
    Dl_info info = {0};
    const char *name = p && dladdr(p, &info) && info.dli_sname ? info.dli_sname : "-";
    int same = p && dlsym(h, name) == p;
    printf("%s %s %s -> %s rc=%d status=%d same=%c\n", argv[i], argv[i + 1], argv[i + 2], name, rc, st,
           same ? 'Y' : 'N');
  }
  return 0;
}
