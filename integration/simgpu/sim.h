/* Shared state of the simulated GPU: one mmap'd file that every process of a test maps.
 * Layout is fixed-size and zero-initialised by ftruncate, so there is no init step a killed process can leave
 * half done; the only configuration is one 64-bit word set by the first process with a single CAS. */
#pragma once
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#define SIM_MAX_DEV 8
#define SIM_MAX_PROCS 256
/* Busy time is kept in 10 ms buckets over a ring of 10.24 s: enough history for 1 s NVML windows and for work
 * queued ahead (each stream queues at most ~1 s). */
#define SIM_BUCKET_NS 10000000ull
#define SIM_NBUCKETS 1024
#define SIM_LAYOUT 2ull

#define SIM_EXPORT __attribute__((visibility("default")))

struct sim_proc {
  /* 0 = free, >0 = owner pid, <0 = being reaped by pid -value (another reaper takes over if that one dies). */
  _Atomic int32_t pid;
  /* The owner's pid in the namespace the test runs in (the "host"): getpid() there, or read through the host's
   * procfs (VGPU_SIM_HOST_PROC) inside a pid namespace. */
  _Atomic int32_t host_pid;
  /* Owner's start time (clock ticks since boot, /proc/pid/stat field 22) so a reused pid is not taken for the
   * owner; 0 while a claim is in progress. */
  _Atomic uint64_t starttime;
  /* Inode of the owner's pid namespace: `pid` means something only there. */
  _Atomic uint64_t pidns;
  _Atomic uint64_t mem[SIM_MAX_DEV];
  _Atomic uint64_t busy_ns[SIM_MAX_DEV];
  _Atomic uint64_t tail_ns[SIM_MAX_DEV];
  _Atomic uint64_t bucket[SIM_MAX_DEV][SIM_NBUCKETS];
};

struct sim_dev {
  _Atomic uint64_t busy_until_ns;
  char pad1[56];
  _Atomic uint64_t busy_total_ns;
  _Atomic uint64_t launches;
  char pad2[48];
  _Atomic uint64_t bucket[SIM_NBUCKETS];
};

struct sim_state {
  /* bit 63 set, bits 56..62 layout, 48..55 device count, 0..47 MiB per device. */
  _Atomic uint64_t config;
  char pad[56];
  struct sim_dev dev[SIM_MAX_DEV];
  struct sim_proc proc[SIM_MAX_PROCS];
};

/* Maps the state file once; NULL (with a message on stderr) when it cannot. */
struct sim_state *sim_state(void);
int sim_ndev(void);
uint64_t sim_total_bytes(int dev);
uint64_t sim_now_ns(void);
void sim_sleep_until(uint64_t t_ns);
/* This process's slot, claimed on first use (and again in a forked child). */
struct sim_proc *sim_self(void);
/* Returns 0, or 2 (CUDA_ERROR_OUT_OF_MEMORY) when the card has not `bytes` free. */
int sim_charge(int dev, uint64_t bytes);
void sim_uncharge(int dev, uint64_t bytes);
/* Drops the slots of dead processes, freeing their memory as the driver does at process exit. */
void sim_reap(void);
uint64_t sim_used_bytes(int dev);
/* Records that [start, end) of device time ran work of this process. */
void sim_book(int dev, uint64_t start, uint64_t end);
/* Busy ns of the device, or of one process (p != NULL), within [a, now]. */
uint64_t sim_busy_between(int dev, struct sim_proc *p, uint64_t a, uint64_t now);
void sim_uuid(int dev, char *out, unsigned len);
/* The pid NVML names slot p's owner by, for a caller in this process: VGPU_SIM_NVML_PIDS=host names host pids
 * (some drivers do, whatever the caller's namespace); otherwise (`namespace`, the default, as driver 580 on the
 * H200) the owner's own pid to a caller in the owner's pid namespace and its host pid to anyone else. */
unsigned sim_reported_pid(struct sim_proc *p);
#define SIM_NAME "NVIDIA Simulated H100"
#define SIM_DRIVER_VERSION "580.95.05"
#define SIM_CUDA_VERSION 13000
