/* The simulated card's shared state: memory held per process and device busy time. Linked (hidden) into both
 * libcuda.so.1 and libnvidia-ml.so.1. Lock free: a process killed at any instruction leaves at worst a slot whose
 * pid is dead, which the next reaper frees. */
#define _GNU_SOURCE
#include "sim.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static struct sim_state *g_state;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_ndev;
static uint64_t g_total;
static struct sim_proc *g_self;
static pthread_mutex_t g_self_mu = PTHREAD_MUTEX_INITIALIZER;

static uint64_t env_u64(const char *name, uint64_t dflt) {
  const char *v = getenv(name);
  if (!v || !*v) return dflt;
  char *end;
  unsigned long long x = strtoull(v, &end, 10);
  if (*end) {
    fprintf(stderr, "simgpu: ignoring %s=%s (not a number)\n", name, v);
    return dflt;
  }
  return x;
}

static void after_fork_child(void) {
  /* The child is a new process to the driver: it gets its own slot on first use. */
  g_self = NULL;
  pthread_mutex_init(&g_self_mu, NULL);
}

static void map_state(void) {
  const char *path = getenv("VGPU_SIM_STATE");
  if (!path || !*path) path = "/dev/shm/vgpu-sim-state";
  uint64_t ndev = env_u64("VGPU_SIM_DEVICES", 1);
  uint64_t mib = env_u64("VGPU_SIM_MEMORY_MIB", 16384);
  if (ndev < 1) ndev = 1;
  if (ndev > SIM_MAX_DEV) ndev = SIM_MAX_DEV;
  if (mib > (1ull << 47)) mib = 1ull << 47;
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) {
    fprintf(stderr, "simgpu: cannot open %s: %s\n", path, strerror(errno));
    return;
  }
  struct stat st;
  /* Concurrent starters may all ftruncate to the same size: growing only adds zeros, so that is harmless. */
  if (fstat(fd, &st) == 0 && (size_t)st.st_size < sizeof(struct sim_state) &&
      ftruncate(fd, sizeof(struct sim_state)) != 0) {
    fprintf(stderr, "simgpu: cannot size %s: %s\n", path, strerror(errno));
    close(fd);
    return;
  }
  void *m = mmap(NULL, sizeof(struct sim_state), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) {
    fprintf(stderr, "simgpu: cannot map %s: %s\n", path, strerror(errno));
    return;
  }
  struct sim_state *s = m;
  uint64_t want = (1ull << 63) | (SIM_LAYOUT << 56) | (ndev << 48) | mib;
  uint64_t zero = 0;
  atomic_compare_exchange_strong(&s->config, &zero, want);
  uint64_t cfg = atomic_load(&s->config);
  if (((cfg >> 56) & 0x7f) != SIM_LAYOUT) {
    fprintf(stderr, "simgpu: %s has another layout; delete it\n", path);
    munmap(m, sizeof(struct sim_state));
    return;
  }
  g_ndev = (int)((cfg >> 48) & 0xff);
  g_total = (cfg & ((1ull << 48) - 1)) << 20;
  pthread_atfork(NULL, NULL, after_fork_child);
  g_state = s;
}

struct sim_state *sim_state(void) {
  pthread_once(&g_once, map_state);
  return g_state;
}

int sim_ndev(void) { return sim_state() ? g_ndev : 0; }
uint64_t sim_total_bytes(int dev) { return (dev >= 0 && dev < sim_ndev()) ? g_total : 0; }

uint64_t sim_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void sim_sleep_until(uint64_t t) {
  struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
  }
}

/* Start time of pid (field 22 of /proc/pid/stat), 0 if the process is gone or a zombie: the driver frees a
 * process's memory when it exits, before its parent reaps it. */
static uint64_t starttime_in(const char *proc, pid_t pid) {
  char path[512], buf[1024];
  snprintf(path, sizeof path, "%s/%d/stat", proc, (int)pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = 0;
  char *p = strrchr(buf, ')');
  if (!p || p[1] != ' ') return 0;
  p += 2;
  if (*p == 'Z' || *p == 'X' || *p == 'x') return 0;
  /* p is at field 3 (state); starttime is field 22. */
  for (int f = 3; f < 22; f++) {
    p = strchr(p, ' ');
    if (!p) return 0;
    p++;
  }
  uint64_t st = strtoull(p, NULL, 10);
  return st ? st : 1;
}

static uint64_t proc_starttime(pid_t pid) { return starttime_in("/proc", pid); }

/* Inode of this process's pid namespace (0 if unknown). */
static uint64_t own_pidns(void) {
  struct stat st;
  return stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
}

/* The host's procfs: VGPU_SIM_HOST_PROC inside a pid namespace (a bind mount of the outer /proc), else /proc. */
static const char *host_proc(void) {
  const char *h = getenv("VGPU_SIM_HOST_PROC");
  return h && *h ? h : NULL;
}

/* This process's pid in the host namespace: what `self` names in the host's procfs. */
static int32_t own_host_pid(void) {
  const char *h = host_proc();
  if (!h) return (int32_t)getpid();
  char path[512], buf[32];
  snprintf(path, sizeof path, "%s/self", h);
  ssize_t n = readlink(path, buf, sizeof buf - 1);
  if (n <= 0) return 0;
  buf[n] = 0;
  return (int32_t)atoi(buf);
}

/* Start time of the host's `pid`, read through the host's procfs. */
static uint64_t host_starttime(pid_t pid) {
  const char *h = host_proc();
  return starttime_in(h ? h : "/proc", pid);
}

/* A slot's owner is judged where its pid means something: by its own pid in its own namespace, else by its
 * host pid on the host (a pid namespace's pids would name unrelated host processes). */
static int slot_alive(struct sim_proc *p, pid_t pid) {
  uint64_t want = atomic_load(&p->starttime);
  uint64_t ns = atomic_load(&p->pidns);
  uint64_t st;
  if (ns == 0 || ns == own_pidns()) {
    st = proc_starttime(pid);
  } else {
    int32_t hp = atomic_load(&p->host_pid);
    if (hp <= 0) return 1; /* cannot tell from here: its own namespace will */
    st = host_starttime(hp);
  }
  if (!st) return 0;
  return want == 0 || want == st;
}

unsigned sim_reported_pid(struct sim_proc *p) {
  const char *mode = getenv("VGPU_SIM_NVML_PIDS");
  int32_t pid = atomic_load(&p->pid), hp = atomic_load(&p->host_pid);
  if (mode && !strcmp(mode, "host")) return (unsigned)(hp > 0 ? hp : pid);
  uint64_t ns = atomic_load(&p->pidns);
  if (ns == 0 || ns == own_pidns() || hp <= 0) return (unsigned)pid;
  return (unsigned)hp;
}

void sim_reap(void) {
  struct sim_state *s = sim_state();
  if (!s) return;
  int32_t me = (int32_t)getpid();
  for (int i = 0; i < SIM_MAX_PROCS; i++) {
    struct sim_proc *p = &s->proc[i];
    int32_t pid = atomic_load(&p->pid);
    if (pid == 0 || pid == me) continue;
    if (pid > 0) {
      if (slot_alive(p, pid)) continue;
    } else if (proc_starttime(-pid)) {
      continue; /* a live reaper is on it */
    }
    /* Only the CAS winner frees the slot, so a late reaper never wipes a slot someone claimed meanwhile. */
    if (!atomic_compare_exchange_strong(&p->pid, &pid, -me)) continue;
    for (int d = 0; d < SIM_MAX_DEV; d++) atomic_store(&p->mem[d], 0);
    atomic_store(&p->starttime, 0);
    atomic_store(&p->pidns, 0);
    atomic_store(&p->host_pid, 0);
    int32_t mine = -me;
    atomic_compare_exchange_strong(&p->pid, &mine, 0);
  }
}

static void reset_slot(struct sim_proc *p) {
  for (int d = 0; d < SIM_MAX_DEV; d++) {
    atomic_store(&p->mem[d], 0);
    atomic_store(&p->busy_ns[d], 0);
    atomic_store(&p->tail_ns[d], 0);
    for (int b = 0; b < SIM_NBUCKETS; b++) atomic_store_explicit(&p->bucket[d][b], 0, memory_order_relaxed);
  }
}

static void release_self(void) {
  /* A clean exit frees the process's memory at once, as the driver does; a kill leaves it to sim_reap. */
  struct sim_proc *p = g_self;
  if (!p) return;
  int32_t me = (int32_t)getpid();
  for (int d = 0; d < SIM_MAX_DEV; d++) atomic_store(&p->mem[d], 0);
  atomic_store(&p->starttime, 0);
  atomic_compare_exchange_strong(&p->pid, &me, 0);
}

struct sim_proc *sim_self(void) {
  struct sim_proc *p = g_self;
  if (p) return p;
  struct sim_state *s = sim_state();
  if (!s) return NULL;
  pthread_mutex_lock(&g_self_mu);
  if (g_self) {
    pthread_mutex_unlock(&g_self_mu);
    return g_self;
  }
  int32_t me = (int32_t)getpid();
  uint64_t st = proc_starttime(me);
  uint64_t ns = own_pidns();
  /* A slot already under our pid (in our namespace) belongs to our image before exec or to a dead process whose
   * pid we reuse. */
  for (int i = 0; i < SIM_MAX_PROCS && !p; i++)
    if (atomic_load(&s->proc[i].pid) == me && atomic_load(&s->proc[i].pidns) == ns) p = &s->proc[i];
  for (int attempt = 0; attempt < 2 && !p; attempt++) {
    for (int i = 0; i < SIM_MAX_PROCS; i++) {
      int32_t zero = 0;
      if (atomic_compare_exchange_strong(&s->proc[i].pid, &zero, me)) {
        p = &s->proc[i];
        break;
      }
    }
    if (!p) sim_reap();
  }
  if (p) {
    reset_slot(p);
    atomic_store(&p->pidns, ns);
    atomic_store(&p->host_pid, own_host_pid());
    atomic_store(&p->starttime, st);
    static int registered;
    if (!registered) {
      registered = 1;
      atexit(release_self);
    }
  } else {
    fprintf(stderr, "simgpu: process table full (%d)\n", SIM_MAX_PROCS);
  }
  g_self = p;
  pthread_mutex_unlock(&g_self_mu);
  return p;
}

uint64_t sim_used_bytes(int dev) {
  struct sim_state *s = sim_state();
  if (!s || dev < 0 || dev >= SIM_MAX_DEV) return 0;
  uint64_t sum = 0;
  for (int i = 0; i < SIM_MAX_PROCS; i++)
    if (atomic_load(&s->proc[i].pid) != 0) sum += atomic_load(&s->proc[i].mem[dev]);
  return sum;
}

int sim_charge(int dev, uint64_t bytes) {
  struct sim_proc *p = sim_self();
  if (!p || dev < 0 || dev >= sim_ndev()) return 2;
  uint64_t total = g_total;
  /* Add first, then check the sum: concurrent chargers can never overcommit the card together. Two racing at
   * the boundary may both back off, so a refusal retries after reaping and yielding. */
  for (int attempt = 0; attempt < 4; attempt++) {
    atomic_fetch_add(&p->mem[dev], bytes);
    uint64_t used = sim_used_bytes(dev);
    if (used <= total) return 0;
    atomic_fetch_sub(&p->mem[dev], bytes);
    if (attempt == 0) sim_reap();
    else sched_yield();
  }
  return 2;
}

void sim_uncharge(int dev, uint64_t bytes) {
  struct sim_proc *p = sim_self();
  if (!p || dev < 0 || dev >= SIM_MAX_DEV) return;
  uint64_t cur = atomic_load(&p->mem[dev]);
  while (!atomic_compare_exchange_weak(&p->mem[dev], &cur, cur >= bytes ? cur - bytes : 0)) {
  }
}

/* A bucket word is (low 32 bits of the bucket's index << 32) | busy ns in it, so a stale bucket from the
 * previous turn of the ring is recognised and restarted in the same CAS that adds to it. */
static void bucket_add(_Atomic uint64_t *ring, uint64_t start, uint64_t end) {
  while (start < end) {
    uint64_t idx = start / SIM_BUCKET_NS;
    uint64_t bend = (idx + 1) * SIM_BUCKET_NS;
    uint64_t e = end < bend ? end : bend;
    uint64_t amt = e - start;
    uint32_t ep = (uint32_t)idx;
    _Atomic uint64_t *w = &ring[idx % SIM_NBUCKETS];
    uint64_t old = atomic_load_explicit(w, memory_order_relaxed);
    for (;;) {
      uint32_t oep = (uint32_t)(old >> 32);
      uint64_t nv;
      if (oep == ep) nv = old + amt;
      else if ((int32_t)(ep - oep) > 0) nv = ((uint64_t)ep << 32) | amt;
      else break;
      if (atomic_compare_exchange_weak_explicit(w, &old, nv, memory_order_relaxed, memory_order_relaxed)) break;
    }
    start = e;
  }
}

static uint64_t bucket_get(_Atomic uint64_t *ring, uint64_t idx) {
  uint64_t v = atomic_load_explicit(&ring[idx % SIM_NBUCKETS], memory_order_relaxed);
  return (uint32_t)(v >> 32) == (uint32_t)idx ? (v & 0xffffffffull) : 0;
}

void sim_book(int dev, uint64_t start, uint64_t end) {
  struct sim_state *s = sim_state();
  struct sim_proc *p = sim_self();
  if (!s || dev < 0 || dev >= SIM_MAX_DEV || end <= start) return;
  bucket_add(s->dev[dev].bucket, start, end);
  atomic_fetch_add_explicit(&s->dev[dev].busy_total_ns, end - start, memory_order_relaxed);
  atomic_fetch_add_explicit(&s->dev[dev].launches, 1, memory_order_relaxed);
  if (p) {
    bucket_add(p->bucket[dev], start, end);
    atomic_fetch_add_explicit(&p->busy_ns[dev], end - start, memory_order_relaxed);
    uint64_t t = atomic_load_explicit(&p->tail_ns[dev], memory_order_relaxed);
    while (t < end &&
           !atomic_compare_exchange_weak_explicit(&p->tail_ns[dev], &t, end, memory_order_relaxed,
                                                  memory_order_relaxed)) {
    }
  }
}

static uint64_t overlap(uint64_t a0, uint64_t a1, uint64_t b0, uint64_t b1) {
  uint64_t lo = a0 > b0 ? a0 : b0, hi = a1 < b1 ? a1 : b1;
  return hi > lo ? hi - lo : 0;
}

uint64_t sim_busy_between(int dev, struct sim_proc *p, uint64_t a, uint64_t now) {
  struct sim_state *s = sim_state();
  if (!s || dev < 0 || dev >= SIM_MAX_DEV || now <= a) return 0;
  _Atomic uint64_t *ring = p ? p->bucket[dev] : s->dev[dev].bucket;
  /* Buckets also hold work booked ahead of now. On the device, work after now is exactly [now, busy_until)
   * (the FIFO runs without gaps once queued), so it is subtracted; for a process that interval bounds it. */
  uint64_t fut_end = p ? atomic_load(&p->tail_ns[dev]) : atomic_load(&s->dev[dev].busy_until_ns);
  if (now - a > (SIM_NBUCKETS - 2) * SIM_BUCKET_NS) a = now - (SIM_NBUCKETS - 2) * SIM_BUCKET_NS;
  double sum = 0;
  for (uint64_t idx = a / SIM_BUCKET_NS; idx <= now / SIM_BUCKET_NS; idx++) {
    uint64_t bs = idx * SIM_BUCKET_NS, be = bs + SIM_BUCKET_NS;
    uint64_t v = bucket_get(ring, idx);
    if (!v) continue;
    uint64_t fut = overlap(now, fut_end, bs, be);
    uint64_t past = v > fut ? v - fut : 0;
    uint64_t pe = be < now ? be : now;
    if (pe <= bs) continue;
    /* Within the part of the bucket before now, work is taken as spread evenly. */
    uint64_t span = pe - bs;
    if (past > span) past = span;
    sum += (double)past * (double)overlap(a, now, bs, pe) / (double)span;
  }
  return (uint64_t)sum;
}

/* VGPU_SIM_NODE (0-65535) gives each simulated node cards of its own UUIDs, as real nodes have. */
void sim_uuid(int dev, char *out, unsigned len) {
  unsigned node = (unsigned)(env_u64("VGPU_SIM_NODE", 0) & 0xffff);
  snprintf(out, len, "GPU-5a1c%04x-0000-4000-8000-0000000000%02x", node, dev & 0xff);
}
