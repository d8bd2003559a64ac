/* Every allocation kind the shim covers, each allocated and freed in turn.
 *   cuda_allockinds [-m dlsym|proc|ptsz] [-s MIB] [-k KIND] [-H HOLD_MS]
 * KIND: alloc pitch managed async pool vmm array array3d mipmap (default: all, in that order). Prints
 * `<kind> alloc rc=R used=U MiB` and `<kind> free rc=R used=U MiB`, U from cuMemGetInfo (total - free). With -H
 * the last kind's memory is held HOLD_MS ms (`Holding`) before being freed. In ptsz mode async and pool use the
 * _ptsz entry points. */
#include "cuda_common.h"

#include <unistd.h>

typedef struct {
  size_t Width, Height;
  int Format;
  unsigned NumChannels;
} desc2d;
typedef struct {
  size_t Width, Height, Depth;
  int Format;
  unsigned NumChannels, Flags;
} desc3d;
struct prop {
  int type, handle_types, loc_type, loc_id;
  void *win32;
  unsigned char flags[8];
};

static int (*getinfo)(size_t *, size_t *);

static void report(const char *kind, const char *what, int rc) {
  size_t f = 0, t = 0;
  getinfo(&f, &t);
  printf("%s %s rc=%d used=%zu MiB\n", kind, what, rc, (t - f) >> 20);
  fflush(stdout);
}

int main(int argc, char **argv) {
  const char *mode = "proc", *only = NULL;
  size_t mib = 256;
  int hold_ms = 0, opt;
  while ((opt = getopt(argc, argv, "m:s:k:H:")) != -1) {
    switch (opt) {
    case 'm': mode = optarg; break;
    case 's': mib = (size_t)atol(optarg); break;
    case 'k': only = optarg; break;
    case 'H': hold_ms = atoi(optarg); break;
    default: return 3;
    }
  }
  cu_open(mode);
  int (*init)(unsigned);
  int (*retain)(void **, int);
  int (*setcur)(void *);
  int (*alloc)(unsigned long long *, size_t);
  int (*mfree)(unsigned long long);
  int (*pitch)(unsigned long long *, size_t *, size_t, size_t, unsigned);
  int (*managed)(unsigned long long *, size_t, unsigned);
  int (*async)(unsigned long long *, size_t, void *);
  int (*pool)(unsigned long long *, size_t, void *, void *);
  int (*freeasync)(unsigned long long, void *);
  int (*create)(unsigned long long *, size_t, const struct prop *, unsigned long long);
  int (*release)(unsigned long long);
  int (*reserve)(unsigned long long *, size_t, size_t, unsigned long long, unsigned long long);
  int (*map)(unsigned long long, size_t, size_t, unsigned long long, unsigned long long);
  int (*unmap)(unsigned long long, size_t);
  int (*addrfree)(unsigned long long, size_t);
  int (*arr2)(void **, const desc2d *);
  int (*arr3)(void **, const desc3d *);
  int (*arrfree)(void *);
  int (*mip)(void **, const desc3d *, unsigned);
  int (*mipfree)(void *);
  CU_SYM(init, "cuInit", cuInit);
  CU_SYM(retain, "cuDevicePrimaryCtxRetain", cuDevicePrimaryCtxRetain);
  CU_SYM(setcur, "cuCtxSetCurrent", cuCtxSetCurrent);
  CU_SYM(getinfo, "cuMemGetInfo", cuMemGetInfo_v2);
  CU_SYM(alloc, "cuMemAlloc", cuMemAlloc_v2);
  CU_SYM(mfree, "cuMemFree", cuMemFree_v2);
  CU_SYM(pitch, "cuMemAllocPitch", cuMemAllocPitch_v2);
  CU_SYM(managed, "cuMemAllocManaged", cuMemAllocManaged);
  if (cu_flags) {
    CU_SYM(async, "cuMemAllocAsync", cuMemAllocAsync_ptsz);
    CU_SYM(pool, "cuMemAllocFromPoolAsync", cuMemAllocFromPoolAsync_ptsz);
    CU_SYM(freeasync, "cuMemFreeAsync", cuMemFreeAsync_ptsz);
  } else {
    CU_SYM(async, "cuMemAllocAsync", cuMemAllocAsync);
    CU_SYM(pool, "cuMemAllocFromPoolAsync", cuMemAllocFromPoolAsync);
    CU_SYM(freeasync, "cuMemFreeAsync", cuMemFreeAsync);
  }
  CU_SYM(create, "cuMemCreate", cuMemCreate);
  CU_SYM(release, "cuMemRelease", cuMemRelease);
  CU_SYM(reserve, "cuMemAddressReserve", cuMemAddressReserve);
  CU_SYM(map, "cuMemMap", cuMemMap);
  CU_SYM(unmap, "cuMemUnmap", cuMemUnmap);
  CU_SYM(addrfree, "cuMemAddressFree", cuMemAddressFree);
  CU_SYM(arr2, "cuArrayCreate", cuArrayCreate_v2);
  CU_SYM(arr3, "cuArray3DCreate", cuArray3DCreate_v2);
  CU_SYM(arrfree, "cuArrayDestroy", cuArrayDestroy);
  CU_SYM(mip, "cuMipmappedArrayCreate", cuMipmappedArrayCreate);
  CU_SYM(mipfree, "cuMipmappedArrayDestroy", cuMipmappedArrayDestroy);
  int r = init(0);
  void *ctx;
  if (r || (r = retain(&ctx, 0)) || (r = setcur(ctx))) {
    printf("init failed: rc=%d\n", r);
    return 3;
  }
  size_t bytes = mib << 20;
  report("start", "none", 0);
  static const char *kinds[] = {"alloc", "pitch", "managed", "async", "pool", "vmm", "array", "array3d", "mipmap"};
  for (unsigned k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
    const char *kind = kinds[k];
    if (only && strcmp(only, kind)) continue;
    unsigned long long p = 0, h = 0, va = 0;
    void *arr = NULL;
    size_t pitchb = 0;
    if (!strcmp(kind, "alloc")) r = alloc(&p, bytes);
    else if (!strcmp(kind, "pitch")) r = pitch(&p, &pitchb, 1 << 20, mib, 4); /* 1 MiB rows: already pitched */
    else if (!strcmp(kind, "managed")) r = managed(&p, bytes, 1);
    else if (!strcmp(kind, "async")) r = async(&p, bytes, NULL);
    else if (!strcmp(kind, "pool")) r = pool(&p, bytes, (void *)0x10, NULL);
    else if (!strcmp(kind, "vmm")) {
      struct prop pr = {.type = 1, .loc_type = 1, .loc_id = 0};
      r = create(&h, bytes, &pr, 0);
      if (!r) r = reserve(&va, bytes, 0, 0, 0);
      if (!r) r = map(va, bytes, 0, h, 0);
    } else if (!strcmp(kind, "array")) {
      desc2d d = {.Width = 1 << 16, .Height = mib * 4, .Format = 0x20, .NumChannels = 1}; /* 256 KiB rows */
      r = arr2(&arr, &d);
    } else if (!strcmp(kind, "array3d")) {
      desc3d d = {.Width = 1 << 12, .Height = 64, .Depth = mib, .Format = 0x01, .NumChannels = 4};
      r = arr3(&arr, &d);
    } else {
      /* Levels of a 2D mipmap halve both sides: 1 + 1/4 + 1/16 = 21/16 of the base level. */
      desc3d d = {.Width = 1 << 12, .Height = mib * 16 / 21 * 64, .Format = 0x20, .NumChannels = 1};
      r = mip(&arr, &d, 3);
    }
    report(kind, "alloc", r);
    if (r) continue;
    if (hold_ms && (!only || !strcmp(only, kind))) {
      printf("Holding\n");
      fflush(stdout);
      usleep((useconds_t)hold_ms * 1000);
    }
    if (!strcmp(kind, "async") || !strcmp(kind, "pool")) r = freeasync(p, NULL);
    else if (!strcmp(kind, "vmm")) {
      r = unmap(va, bytes);
      if (!r) r = addrfree(va, bytes);
      if (!r) r = release(h);
    } else if (!strcmp(kind, "array") || !strcmp(kind, "array3d")) r = arrfree(arr);
    else if (!strcmp(kind, "mipmap")) r = mipfree(arr);
    else r = mfree(p);
    report(kind, "free", r);
  }
  return 0;
}
