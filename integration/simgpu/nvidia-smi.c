/* nvidia-smi stand-in. Like the real tool it dlopens libnvidia-ml.so.1 and dlsyms every function on that
 * handle, so a preloaded shim is exercised the way the real nvidia-smi exercises it.
 *   nvidia-smi                                   table in nvidia-smi's style, `<used>MiB / <total>MiB`
 *   nvidia-smi --query-gpu=F,... --format=csv[,noheader][,nounits]
 *        F: index, name, uuid, memory.used, memory.total, memory.free, utilization.gpu
 *   nvidia-smi --query-compute-apps=pid,used_memory --format=csv[,noheader][,nounits]
 *   nvidia-smi pmon -c 1                          per-process smUtil (nvmlDeviceGetProcessUtilization) */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  unsigned long long total, free, used;
} mem_t;
typedef struct {
  unsigned int pid;
  unsigned long long used;
  unsigned int gi, ci;
} proc_t;
typedef struct {
  unsigned int gpu, memory;
} util_t;
typedef struct {
  unsigned int pid;
  unsigned long long ts;
  unsigned int sm, mem, enc, dec;
} sample_t;

static void *h;
static void *sym(const char *name) {
  void *p = dlsym(h, name);
  if (!p) {
    fprintf(stderr, "nvidia-smi: %s missing from libnvidia-ml.so.1\n", name);
    exit(9);
  }
  return p;
}

#define MIB(x) ((x) >> 20)

static int (*init_)(void);
static int (*count_)(unsigned *);
static int (*handle_)(unsigned, void **);
static int (*name_)(void *, char *, unsigned);
static int (*uuid_)(void *, char *, unsigned);
static int (*meminfo_)(void *, mem_t *);
static int (*procs_)(void *, unsigned *, proc_t *);
static int (*util_)(void *, util_t *);
static int (*putil_)(void *, sample_t *, unsigned *, unsigned long long);
static int (*drv_)(char *, unsigned);
static const char *(*err_)(int);

static void proc_name(unsigned pid, char *out, size_t len) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%u/comm", pid);
  FILE *f = fopen(path, "r");
  out[0] = 0;
  if (f) {
    if (fgets(out, (int)len, f)) out[strcspn(out, "\n")] = 0;
    fclose(f);
  }
  if (!out[0]) snprintf(out, len, "?");
}

static unsigned list_procs(void *dev, proc_t *ps, unsigned cap) {
  unsigned n = cap;
  int r = procs_(dev, &n, ps);
  if (r) {
    fprintf(stderr, "nvidia-smi: processes: %s\n", err_(r));
    return 0;
  }
  return n;
}

static int table(unsigned ndev) {
  char drv[80] = "";
  drv_(drv, sizeof drv);
  printf("+-----------------------------------------------------------------------------------------+\n");
  printf("| NVIDIA-SMI %-22s Driver Version: %-14s CUDA Version: 13.0     |\n", drv, drv);
  printf("|-----------------------------------------+------------------------+----------------------+\n");
  printf("| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |\n");
  printf("| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |\n");
  printf("|=========================================+========================+======================|\n");
  for (unsigned i = 0; i < ndev; i++) {
    void *d;
    char name[96] = "";
    mem_t m = {0};
    util_t u = {0};
    handle_(i, &d);
    name_(d, name, sizeof name);
    int r = meminfo_(d, &m);
    if (r) {
      fprintf(stderr, "nvidia-smi: memory info: %s\n", err_(r));
      return 1;
    }
    util_(d, &u);
    char usage[64];
    snprintf(usage, sizeof usage, "%lluMiB / %lluMiB", MIB(m.used), MIB(m.total));
    printf("| %3u  %-28s  On  |   00000000:%02X:00.0 Off |                    0 |\n", i, name, 0x18 + i);
    printf("| N/A   33C    P0             71W /  700W | %22s | %7u%%      Default |\n", usage, u.gpu);
    printf("+-----------------------------------------+------------------------+----------------------+\n");
  }
  printf("\n| Processes:                                                                              |\n");
  printf("|  GPU   GI   CI              PID   Type   Process name                        GPU Memory |\n");
  printf("|=========================================================================================|\n");
  for (unsigned i = 0; i < ndev; i++) {
    void *d;
    proc_t ps[256];
    handle_(i, &d);
    unsigned n = list_procs(d, ps, 256);
    for (unsigned k = 0; k < n; k++) {
      char comm[64];
      proc_name(ps[k].pid, comm, sizeof comm);
      printf("|  %3u   N/A  N/A  %15u      C   %-32s %8lluMiB |\n", i, ps[k].pid, comm, MIB(ps[k].used));
    }
  }
  printf("+-----------------------------------------------------------------------------------------+\n");
  return 0;
}

static int query_gpu(unsigned ndev, char *fields, int header, int units) {
  char *f[16];
  int nf = 0;
  for (char *t = strtok(fields, ","); t && nf < 16; t = strtok(NULL, ",")) f[nf++] = t;
  if (header) {
    for (int k = 0; k < nf; k++) {
      const char *unit = "";
      if (!strncmp(f[k], "memory.", 7)) unit = " [MiB]";
      if (!strcmp(f[k], "utilization.gpu")) unit = " [%]";
      printf("%s%s%s", k ? ", " : "", f[k], units ? unit : "");
    }
    printf("\n");
  }
  for (unsigned i = 0; i < ndev; i++) {
    void *d;
    handle_(i, &d);
    mem_t m = {0};
    int r = meminfo_(d, &m);
    if (r) {
      fprintf(stderr, "nvidia-smi: memory info: %s\n", err_(r));
      return 1;
    }
    for (int k = 0; k < nf; k++) {
      char buf[128];
      const char *mu = units ? " MiB" : "";
      if (!strcmp(f[k], "index")) snprintf(buf, sizeof buf, "%u", i);
      else if (!strcmp(f[k], "name")) name_(d, buf, sizeof buf);
      else if (!strcmp(f[k], "uuid")) uuid_(d, buf, sizeof buf);
      else if (!strcmp(f[k], "memory.used")) snprintf(buf, sizeof buf, "%llu%s", MIB(m.used), mu);
      else if (!strcmp(f[k], "memory.total")) snprintf(buf, sizeof buf, "%llu%s", MIB(m.total), mu);
      else if (!strcmp(f[k], "memory.free")) snprintf(buf, sizeof buf, "%llu%s", MIB(m.free), mu);
      else if (!strcmp(f[k], "utilization.gpu")) {
        util_t u = {0};
        util_(d, &u);
        snprintf(buf, sizeof buf, "%u%s", u.gpu, units ? " %" : "");
      } else {
        fprintf(stderr, "Field \"%s\" is not a valid field to query.\n", f[k]);
        return 2;
      }
      printf("%s%s", k ? ", " : "", buf);
    }
    printf("\n");
  }
  return 0;
}

static int query_apps(unsigned ndev, int header, int units) {
  if (header) printf("pid, used_gpu_memory%s\n", units ? " [MiB]" : "");
  for (unsigned i = 0; i < ndev; i++) {
    void *d;
    proc_t ps[256];
    handle_(i, &d);
    unsigned n = list_procs(d, ps, 256);
    for (unsigned k = 0; k < n; k++) printf("%u, %llu%s\n", ps[k].pid, MIB(ps[k].used), units ? " MiB" : "");
  }
  return 0;
}

static int pmon(unsigned ndev) {
  printf("# gpu         pid   type     sm    mem    enc    dec    command\n");
  printf("# Idx           #    C/G      %%      %%      %%      %%    name\n");
  for (unsigned i = 0; i < ndev; i++) {
    void *d;
    sample_t s[256];
    unsigned n = 256;
    handle_(i, &d);
    int r = putil_(d, s, &n, 0);
    if (r == 6 /* NOT_FOUND: nothing ran */) n = 0;
    else if (r) {
      fprintf(stderr, "nvidia-smi: process utilization: %s\n", err_(r));
      return 1;
    }
    for (unsigned k = 0; k < n; k++) {
      char comm[64];
      proc_name(s[k].pid, comm, sizeof comm);
      printf("  %3u %11u     C %6u %6u      -      -    %s\n", i, s[k].pid, s[k].sm, s[k].mem, comm);
    }
  }
  return 0;
}

int main(int argc, char **argv) {
  h = dlopen("libnvidia-ml.so.1", RTLD_NOW);
  if (!h) {
    printf("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n");
    return 9;
  }
  init_ = sym("nvmlInit_v2");
  count_ = sym("nvmlDeviceGetCount_v2");
  handle_ = sym("nvmlDeviceGetHandleByIndex_v2");
  name_ = sym("nvmlDeviceGetName");
  uuid_ = sym("nvmlDeviceGetUUID");
  meminfo_ = sym("nvmlDeviceGetMemoryInfo");
  procs_ = sym("nvmlDeviceGetComputeRunningProcesses_v3");
  util_ = sym("nvmlDeviceGetUtilizationRates");
  putil_ = sym("nvmlDeviceGetProcessUtilization");
  drv_ = sym("nvmlSystemGetDriverVersion");
  err_ = sym("nvmlErrorString");
  int (*shutdown_)(void) = sym("nvmlShutdown");
  int r = init_();
  if (r) {
    printf("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver: %s\n", err_(r));
    return 9;
  }
  unsigned ndev = 0;
  count_(&ndev);
  char *gpu_fields = NULL;
  int apps = 0, header = 1, units = 1, rc;
  for (int i = 1; i < argc; i++) {
    if (!strncmp(argv[i], "--query-gpu=", 12)) gpu_fields = argv[i] + 12;
    else if (!strncmp(argv[i], "--query-compute-apps=", 21)) apps = 1;
    else if (!strncmp(argv[i], "--format=", 9)) {
      header = !strstr(argv[i], "noheader");
      units = !strstr(argv[i], "nounits");
    }
  }
  if (argc > 1 && !strcmp(argv[1], "pmon")) rc = pmon(ndev);
  else if (gpu_fields) rc = query_gpu(ndev, gpu_fields, header, units);
  else if (apps) rc = query_apps(ndev, header, units);
  else rc = table(ndev);
  shutdown_();
  return rc;
}
