/* libnvidia-ml.so.1 of the simulated GPU: the NVML calls nvidia-smi, the agent and the tests use, with the real
 * struct layouts and return codes, answered from the shared state that the simulated libcuda writes. */
#define _GNU_SOURCE
#include "sim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
enum {
  NVML_SUCCESS = 0,
  NVML_ERROR_UNINITIALIZED = 1,
  NVML_ERROR_INVALID_ARGUMENT = 2,
  NVML_ERROR_NOT_SUPPORTED = 3,
  NVML_ERROR_NOT_FOUND = 6,
  NVML_ERROR_INSUFFICIENT_SIZE = 7,
  NVML_ERROR_DRIVER_NOT_LOADED = 9,
  NVML_ERROR_GPU_IS_LOST = 15,
  NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
  NVML_ERROR_UNKNOWN = 999,
};

struct nvml_dev {
  unsigned index;
};
typedef struct nvml_dev *nvmlDevice_t;

typedef struct {
  unsigned long long total, free, used;
} nvmlMemory_t;
typedef struct {
  unsigned int version;
  unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
  unsigned int pid;
  unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t;
typedef struct {
  unsigned int pid;
  unsigned long long usedGpuMemory;
  unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
typedef struct {
  unsigned int gpu, memory;
} nvmlUtilization_t;
typedef struct {
  unsigned int pid;
  unsigned long long timeStamp;
  unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;

#define NVML_MEMORY_V2 ((unsigned)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

static int g_init;
static struct nvml_dev g_devs[SIM_MAX_DEV] = {{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}};

/* Test knob: while the file named by VGPU_SIM_LOST_FILE exists, the device indices it lists (one per line)
 * are lost, as a card that fell off the bus: every call on them fails with NVML_ERROR_GPU_IS_LOST. */
static int lost(unsigned index) {
  const char *path = getenv("VGPU_SIM_LOST_FILE");
  if (!path || !*path) return 0;
  FILE *f = fopen(path, "re");
  if (!f) return 0;
  unsigned i;
  int hit = 0;
  while (!hit && fscanf(f, "%u", &i) == 1) hit = i == index;
  fclose(f);
  return hit;
}

static nvmlReturn_t check(nvmlDevice_t d) {
  if (!g_init) return NVML_ERROR_UNINITIALIZED;
  if (!d || d < g_devs || d >= g_devs + sim_ndev()) return NVML_ERROR_INVALID_ARGUMENT;
  if (lost(d->index)) return NVML_ERROR_GPU_IS_LOST;
  return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlInit_v2(void) {
  if (!sim_state()) return NVML_ERROR_DRIVER_NOT_LOADED;
  g_init++;
  return NVML_SUCCESS;
}
SIM_EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInit_v2(); }
SIM_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned flags) {
  (void)flags;
  return nvmlInit_v2();
}

SIM_EXPORT nvmlReturn_t nvmlShutdown(void) {
  if (!g_init) return NVML_ERROR_UNINITIALIZED;
  g_init--;
  return NVML_SUCCESS;
}

SIM_EXPORT const char *nvmlErrorString(nvmlReturn_t r) {
  switch (r) {
  case NVML_SUCCESS: return "Success";
  case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
  case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
  case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
  case NVML_ERROR_NOT_FOUND: return "Not Found";
  case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
  case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
  case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
  case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument Version Mismatch";
  default: return "Unknown Error";
  }
}

static nvmlReturn_t copy_str(char *out, unsigned len, const char *s) {
  if (!out) return NVML_ERROR_INVALID_ARGUMENT;
  if (strlen(s) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
  memcpy(out, s, strlen(s) + 1);
  return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *v, unsigned len) {
  if (!g_init) return NVML_ERROR_UNINITIALIZED;
  return copy_str(v, len, SIM_DRIVER_VERSION);
}

SIM_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) {
  if (!v) return NVML_ERROR_INVALID_ARGUMENT;
  *v = SIM_CUDA_VERSION;
  return NVML_SUCCESS;
}
SIM_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return nvmlSystemGetCudaDriverVersion(v); }

SIM_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *n) {
  if (!g_init) return NVML_ERROR_UNINITIALIZED;
  if (!n) return NVML_ERROR_INVALID_ARGUMENT;
  *n = (unsigned)sim_ndev();
  return NVML_SUCCESS;
}
SIM_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned *n) { return nvmlDeviceGetCount_v2(n); }

SIM_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned i, nvmlDevice_t *d) {
  if (!g_init) return NVML_ERROR_UNINITIALIZED;
  if (!d || i >= (unsigned)sim_ndev()) return NVML_ERROR_INVALID_ARGUMENT;
  *d = &g_devs[i];
  return NVML_SUCCESS;
}
SIM_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned i, nvmlDevice_t *d) {
  return nvmlDeviceGetHandleByIndex_v2(i, d);
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *d) {
  if (!g_init) return NVML_ERROR_UNINITIALIZED;
  if (!uuid || !d) return NVML_ERROR_INVALID_ARGUMENT;
  for (int i = 0; i < sim_ndev(); i++) {
    char u[64];
    sim_uuid(i, u, sizeof u);
    if (!strcmp(u, uuid)) {
      *d = &g_devs[i];
      return NVML_SUCCESS;
    }
  }
  return NVML_ERROR_NOT_FOUND;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned *i) {
  nvmlReturn_t r = check(d);
  if (r) return r;
  if (!i) return NVML_ERROR_INVALID_ARGUMENT;
  *i = d->index;
  return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned len) {
  nvmlReturn_t r = check(d);
  if (r) return r;
  char u[64];
  sim_uuid((int)d->index, u, sizeof u);
  return copy_str(uuid, len, u);
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned len) {
  nvmlReturn_t r = check(d);
  if (r) return r;
  return copy_str(name, len, SIM_NAME);
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
  nvmlReturn_t r = check(d);
  if (r) return r;
  if (!m) return NVML_ERROR_INVALID_ARGUMENT;
  sim_reap();
  uint64_t t = sim_total_bytes((int)d->index), u = sim_used_bytes((int)d->index);
  if (u > t) u = t;
  m->total = t;
  m->used = u;
  m->free = t - u;
  return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
  if (!m) return NVML_ERROR_INVALID_ARGUMENT;
  if (m->version != NVML_MEMORY_V2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
  nvmlMemory_t v1;
  nvmlReturn_t r = nvmlDeviceGetMemoryInfo(d, &v1);
  if (r) return r;
  m->total = v1.total;
  m->reserved = 0;
  m->free = v1.free;
  m->used = v1.used;
  return NVML_SUCCESS;
}

/* Fills `out` (either struct layout) with the processes holding memory on d; NVML's size protocol. */
static nvmlReturn_t running(nvmlDevice_t d, unsigned *count, void *out, int v1) {
  nvmlReturn_t r = check(d);
  if (r) return r;
  if (!count) return NVML_ERROR_INVALID_ARGUMENT;
  sim_reap();
  struct sim_state *s = sim_state();
  unsigned n = 0;
  unsigned pids[SIM_MAX_PROCS];
  unsigned long long mem[SIM_MAX_PROCS];
  for (int i = 0; i < SIM_MAX_PROCS; i++) {
    int32_t pid = atomic_load(&s->proc[i].pid);
    uint64_t m = atomic_load(&s->proc[i].mem[d->index]);
    if (pid <= 0 || m == 0) continue;
    pids[n] = sim_reported_pid(&s->proc[i]);
    mem[n++] = m;
  }
  if (*count < n || (n && !out)) {
    *count = n;
    return NVML_ERROR_INSUFFICIENT_SIZE;
  }
  for (unsigned i = 0; i < n; i++) {
    if (v1) {
      nvmlProcessInfo_v1_t *p = (nvmlProcessInfo_v1_t *)out + i;
      p->pid = pids[i];
      p->usedGpuMemory = mem[i];
    } else {
      nvmlProcessInfo_t *p = (nvmlProcessInfo_t *)out + i;
      p->pid = pids[i];
      p->usedGpuMemory = mem[i];
      p->gpuInstanceId = 0xFFFFFFFFu;
      p->computeInstanceId = 0xFFFFFFFFu;
    }
  }
  *count = n;
  return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t d, unsigned *c, nvmlProcessInfo_v1_t *p) {
  return running(d, c, p, 1);
}
SIM_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t d, unsigned *c, nvmlProcessInfo_t *p) {
  return running(d, c, p, 0);
}
SIM_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned *c, nvmlProcessInfo_t *p) {
  return running(d, c, p, 0);
}

static unsigned percent(uint64_t busy, uint64_t span) {
  if (!span) return 0;
  uint64_t p = (busy * 100 + span / 2) / span;
  return p > 100 ? 100 : (unsigned)p;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
  nvmlReturn_t r = check(d);
  if (r) return r;
  if (!u) return NVML_ERROR_INVALID_ARGUMENT;
  uint64_t now = sim_now_ns();
  u->gpu = percent(sim_busy_between((int)d->index, NULL, now - 1000000000ull, now), 1000000000ull);
  u->memory = u->gpu / 2;
  return NVML_SUCCESS;
}

/* One sample per process that ran work since lastSeen (microseconds of CLOCK_REALTIME, as NVML's timestamps),
 * with smUtil its share of device time over that window (the last second when lastSeen is 0 or older). */
SIM_EXPORT nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t d, nvmlProcessUtilizationSample_t *out,
                                                        unsigned *count, unsigned long long lastSeen) {
  nvmlReturn_t r = check(d);
  if (r) return r;
  if (!count) return NVML_ERROR_INVALID_ARGUMENT;
  struct timespec rt;
  clock_gettime(CLOCK_REALTIME, &rt);
  uint64_t now_us = (uint64_t)rt.tv_sec * 1000000ull + (uint64_t)rt.tv_nsec / 1000;
  uint64_t now = sim_now_ns();
  uint64_t span = 1000000000ull;
  if (lastSeen && lastSeen < now_us && (now_us - lastSeen) * 1000ull < span) span = (now_us - lastSeen) * 1000ull;
  if (span < SIM_BUCKET_NS) span = SIM_BUCKET_NS;
  struct sim_state *s = sim_state();
  unsigned n = 0;
  nvmlProcessUtilizationSample_t tmp[SIM_MAX_PROCS];
  for (int i = 0; i < SIM_MAX_PROCS; i++) {
    int32_t pid = atomic_load(&s->proc[i].pid);
    if (pid <= 0) continue;
    uint64_t busy = sim_busy_between((int)d->index, &s->proc[i], now - span, now);
    if (!busy) continue;
    tmp[n] = (nvmlProcessUtilizationSample_t){.pid = sim_reported_pid(&s->proc[i]), .timeStamp = now_us,
                                              .smUtil = percent(busy, span), .memUtil = percent(busy, span) / 2};
    n++;
  }
  if (!n) {
    *count = 0;
    return NVML_ERROR_NOT_FOUND;
  }
  if (!out || *count < n) {
    *count = n;
    return NVML_ERROR_INSUFFICIENT_SIZE;
  }
  memcpy(out, tmp, n * sizeof tmp[0]);
  *count = n;
  return NVML_SUCCESS;
}
