/* Kernel launch client for pacing tests. On the simulated GPU a launch runs gridDimX microseconds.
 *   cuda_launch [-m dlsym|proc|ptsz] [-a kernel|ex|coop|graph] [-u US] [-s SECONDS] [-k K] [-n STREAMS]
 *               [-d DEVICE] [-c COUNT]
 * Launches kernels of US microseconds (default 1000) back to back, round robin over STREAMS streams (default 1;
 * 0 = the default stream), synchronizing every K launches (default 10), for SECONDS (default 2). Prints
 * `second I busy F` for each whole second (kernel time completed in it / 1 s) and `overall busy F launches N`.
 * With -c COUNT it instead times COUNT launches of 1 us kernels (synchronizing untimed every 256, so the queue
 * never blocks) and prints `ns_per_launch X`: the CPU cost of a launch call.
 * With -w N each launch is preceded by N rounds of CPU work (a fixed amount of work, not of time, like a
 * framework's per-launch overhead): a launch-bound loop whose rate follows the CPU's speed.
 * With -r MS it serves requests instead: K launches and a synchronize each, arriving at random (exponential gaps
 * of mean MS milliseconds, fixed seed) for SECONDS, and prints `requests N p50 A p99 B max C` (milliseconds from
 * arrival to completion): what waiting for a compute window costs a latency-bound service. */
#include "cuda_common.h"

#include <math.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  unsigned gx, gy, gz, bx, by, bz, shmem;
  void *stream;
  void *attrs;
  unsigned nattrs;
} launch_config;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int (*k_plain)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **,
                      void **);
static int (*k_ex)(const launch_config *, void *, void **, void **);
static int (*k_coop)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **);
static int (*k_graph)(void *, void *);
static const char *api = "kernel";
static volatile unsigned long sink;

/* N rounds of integer work the compiler cannot drop. */
static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void sleep_until_s(double t) {
  struct timespec ts = {(time_t)t, (long)((t - (double)(time_t)t) * 1e9)};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {
  }
}

static void cpu_work(long n) {
  unsigned long x = sink + 1;
  for (long i = 0; i < n; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
  sink = x;
}

static int launch(unsigned us, void *stream) {
  if (!strcmp(api, "ex")) {
    launch_config c = {us, 1, 1, 128, 1, 1, 0, stream, NULL, 0};
    return k_ex(&c, (void *)1, NULL, NULL);
  }
  if (!strcmp(api, "coop")) return k_coop((void *)1, us, 1, 1, 128, 1, 1, 0, stream, NULL);
  if (!strcmp(api, "graph")) return k_graph((void *)(uintptr_t)us, stream);
  return k_plain((void *)1, us, 1, 1, 128, 1, 1, 0, stream, NULL, NULL);
}

int main(int argc, char **argv) {
  const char *mode = "proc";
  unsigned us = 1000;
  double secs = 2, gap_ms = 0;
  int k = 10, nstreams = 1, dev = 0, opt;
  long count = 0, work = 0;
  while ((opt = getopt(argc, argv, "m:a:u:s:k:n:d:c:w:r:")) != -1) {
    switch (opt) {
    case 'm': mode = optarg; break;
    case 'a': api = optarg; break;
    case 'u': us = (unsigned)atoi(optarg); break;
    case 's': secs = atof(optarg); break;
    case 'k': k = atoi(optarg); break;
    case 'n': nstreams = atoi(optarg); break;
    case 'd': dev = atoi(optarg); break;
    case 'c': count = atol(optarg); break;
    case 'w': work = atol(optarg); break;
    case 'r': gap_ms = atof(optarg); break;
    default: return 3;
    }
  }
  if (k < 1) k = 1;
  if (nstreams > 64) nstreams = 64;
  cu_open(mode);
  int (*init)(unsigned);
  int (*retain)(void **, int);
  int (*setcur)(void *);
  int (*screate)(void **, unsigned);
  int (*ssync)(void *);
  CU_SYM(init, "cuInit", cuInit);
  CU_SYM(retain, "cuDevicePrimaryCtxRetain", cuDevicePrimaryCtxRetain);
  CU_SYM(setcur, "cuCtxSetCurrent", cuCtxSetCurrent);
  CU_SYM(screate, "cuStreamCreate", cuStreamCreate);
  CU_SYM(ssync, "cuStreamSynchronize", cuStreamSynchronize);
  if (cu_flags) {
    CU_SYM(k_plain, "cuLaunchKernel", cuLaunchKernel_ptsz);
    CU_SYM(k_ex, "cuLaunchKernelEx", cuLaunchKernelEx_ptsz);
    CU_SYM(k_coop, "cuLaunchCooperativeKernel", cuLaunchCooperativeKernel_ptsz);
    CU_SYM(k_graph, "cuGraphLaunch", cuGraphLaunch_ptsz);
    CU_SYM(ssync, "cuStreamSynchronize", cuStreamSynchronize_ptsz);
  } else {
    CU_SYM(k_plain, "cuLaunchKernel", cuLaunchKernel);
    CU_SYM(k_ex, "cuLaunchKernelEx", cuLaunchKernelEx);
    CU_SYM(k_coop, "cuLaunchCooperativeKernel", cuLaunchCooperativeKernel);
    CU_SYM(k_graph, "cuGraphLaunch", cuGraphLaunch);
  }
  void *ctx;
  int r = init(0);
  if (r || (r = retain(&ctx, dev)) || (r = setcur(ctx))) {
    printf("init failed: rc=%d\n", r);
    return 3;
  }
  void *streams[64] = {NULL};
  int ns = nstreams > 0 ? nstreams : 1;
  for (int i = 0; i < nstreams; i++)
    if ((r = screate(&streams[i], 1))) {
      printf("cuStreamCreate failed: rc=%d\n", r);
      return 3;
    }
  if (count > 0) {
    double total = 0;
    for (long done = 0; done < count;) {
      long batch = count - done < 256 ? count - done : 256;
      double a = now_s();
      for (long i = 0; i < batch; i++)
        if ((r = launch(1, streams[0]))) {
          printf("launch failed: rc=%d\n", r);
          return 3;
        }
      total += now_s() - a;
      ssync(streams[0]);
      done += batch;
    }
    printf("ns_per_launch %.1f\n", total * 1e9 / (double)count);
    return 0;
  }
  if (gap_ms > 0) {
    static double lat[1 << 16];
    long n = 0;
    unsigned seed = 1;
    double arrive = now_s(), end = arrive + secs;
    while (arrive < end && n < (1 << 16)) {
      arrive += -log(1.0 - (double)rand_r(&seed) / ((double)RAND_MAX + 1.0)) * gap_ms / 1e3;
      sleep_until_s(arrive);
      for (int i = 0; i < k; i++)
        if ((r = launch(us, streams[0]))) {
          printf("launch failed: rc=%d\n", r);
          return 3;
        }
      ssync(streams[0]);
      lat[n++] = (now_s() - arrive) * 1e3;
    }
    qsort(lat, (size_t)n, sizeof lat[0], by_value);
    printf("requests %ld p50 %.1f p99 %.1f max %.1f\n", n, lat[n / 2], lat[n * 99 / 100], lat[n - 1]);
    return 0;
  }
  double start = now_s(), last_report = start;
  long launches = 0, synced = 0, synced_at_report = 0;
  int second = 0;
  for (;;) {
    if (work) cpu_work(work);
    if ((r = launch(us, streams[launches % ns]))) {
      printf("launch failed: rc=%d\n", r);
      return 3;
    }
    launches++;
    if (launches % k) continue;
    for (int i = 0; i < ns; i++) ssync(streams[i]);
    synced = launches;
    double t = now_s();
    while (t - last_report >= 1.0) {
      second++;
      printf("second %d busy %.3f\n", second, (double)(synced - synced_at_report) * us / 1e6 / (t - last_report));
      fflush(stdout);
      synced_at_report = synced;
      last_report = t;
    }
    if (t - start >= secs) break;
  }
  double el = now_s() - start;
  printf("overall busy %.3f launches %ld\n", (double)synced * us / 1e6 / el, synced);
  return 0;
}
