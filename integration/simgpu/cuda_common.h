/* Shared by the test clients: how they reach the driver. Built LINKED, the client calls libcuda's exported
 * symbols; otherwise it dlopens libcuda.so.1 and resolves with dlsym or cuGetProcAddress_v2 (-m MODE), the
 * two ways the CUDA runtime does. */
#pragma once
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int (*gpa_t)(const char *, void **, int, unsigned long long, int *);

static __attribute__((unused)) void *cu_handle;
static __attribute__((unused)) gpa_t cu_gpa;
static __attribute__((unused)) int cu_mode_proc, cu_flags;

#ifdef LINKED
extern int cuGetProcAddress_v2(const char *, void **, int, unsigned long long, int *);
#endif

/* mode: "dlsym", "proc" (cuGetProcAddress_v2, version 12000, flags 0) or "ptsz" (the same with
 * CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM). Ignored when LINKED. */
static void cu_open(const char *mode) {
#ifdef LINKED
  (void)mode;
  cu_gpa = cuGetProcAddress_v2;
#else
  cu_handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (!cu_handle) {
    printf("dlopen: %s\n", dlerror());
    exit(3);
  }
  cu_gpa = (gpa_t)dlsym(cu_handle, "cuGetProcAddress_v2");
  cu_mode_proc = strcmp(mode, "dlsym") != 0;
  cu_flags = strcmp(mode, "ptsz") == 0 ? 2 : 0;
  if (strcmp(mode, "dlsym") && strcmp(mode, "proc") && strcmp(mode, "ptsz")) {
    printf("unknown mode %s\n", mode);
    exit(3);
  }
#endif
}

#ifndef LINKED
/* base: name for cuGetProcAddress; versioned: the exported name dlsym looks up. */
static void *cu_sym(const char *base, const char *versioned) {
  void *p = NULL;
  if (cu_mode_proc) {
    int st = -1;
    int r = cu_gpa(base, &p, 12000, (unsigned long long)cu_flags, &st);
    if (r || !p) {
      printf("cuGetProcAddress_v2(%s) failed: rc=%d status=%d\n", base, r, st);
      exit(3);
    }
  } else {
    p = dlsym(cu_handle, versioned);
    if (!p) {
      printf("dlsym(%s) failed\n", versioned);
      exit(3);
    }
  }
  return p;
}
#define CU_SYM(var, base, versioned) var = cu_sym(base, #versioned)
#else
/* Old-style declarations: each client assigns them to correctly typed pointers. */
extern int cuInit();
extern int cuDeviceGet();
extern int cuDevicePrimaryCtxRetain();
extern int cuCtxSetCurrent();
extern int cuCtxSynchronize();
extern int cuMemAlloc_v2();
extern int cuMemGetInfo_v2();
extern int cuMemFree_v2();
extern int cuMemAllocPitch_v2();
extern int cuMemAllocManaged();
extern int cuMemAllocAsync();
extern int cuMemAllocAsync_ptsz();
extern int cuMemAllocFromPoolAsync();
extern int cuMemAllocFromPoolAsync_ptsz();
extern int cuMemFreeAsync();
extern int cuMemFreeAsync_ptsz();
extern int cuMemCreate();
extern int cuMemRelease();
extern int cuMemAddressReserve();
extern int cuMemAddressFree();
extern int cuMemMap();
extern int cuMemUnmap();
extern int cuArrayCreate_v2();
extern int cuArray3DCreate_v2();
extern int cuArrayDestroy();
extern int cuMipmappedArrayCreate();
extern int cuMipmappedArrayDestroy();
extern int cuStreamCreate();
extern int cuStreamSynchronize();
extern int cuLaunchKernel();
extern int cuLaunchKernelEx();
extern int cuLaunchCooperativeKernel();
extern int cuGraphLaunch();
extern int cuEventCreate();
extern int cuEventRecord();
extern int cuEventSynchronize();
extern int cuEventElapsedTime();
extern int cuCtxSetLimit();
extern int cuGraphCreate();
extern int cuGraphAddMemAllocNode();
extern int cuGraphInstantiateWithFlags();
extern int cuGraphExecDestroy();
extern int cuModuleLoadData();
extern int cuModuleUnload();
extern int cuLibraryLoadData();
extern int cuLibraryUnload();
extern int cuMemPoolCreate();
extern int cuMemPoolSetAttribute();
extern int cuMemPoolTrimTo();
#define CU_SYM(var, base, versioned) var = (void *)versioned
#endif
