//! What a probed call did, decoded from the raw [`CallEvent`] the return probe emitted.

use vgpu_agent_ebpf_common::{kind, CallEvent, KIND_MASK};
use vgpu_contract::cuda_arrays::array_bytes;

/// Allocations live in separate handle spaces: a device pointer and a cuMemCreate handle may be equal.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Space {
    DevicePtr,
    MemHandle,
    Array,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Call {
    Alloc {
        space: Space,
        handle: u64,
        bytes: u64,
    },
    Free {
        space: Space,
        handle: u64,
    },
    CtxCreate {
        ctx: u64,
        device: u32,
    },
    PrimaryCtxRelease {
        device: u32,
    },
    CtxDestroy {
        ctx: u64,
    },
}

/// CUresult of the call; 0 is CUDA_SUCCESS.
pub fn status(ev: &CallEvent) -> u32 {
    ev.ret as u32
}

/// The call's effect, or None when it failed (a failed call changes nothing on the device).
pub fn decode(ev: &CallEvent) -> Option<Call> {
    if status(ev) != 0 {
        return None;
    }
    let a = &ev.args;
    let alloc = |space, bytes| {
        Some(Call::Alloc {
            space,
            handle: ev.out0,
            bytes,
        })
    };
    match ev.cookie & KIND_MASK {
        kind::MEM_ALLOC
        | kind::MEM_ALLOC_MANAGED
        | kind::MEM_ALLOC_ASYNC
        | kind::MEM_ALLOC_FROM_POOL_ASYNC => alloc(Space::DevicePtr, a[1]),
        // cuMemAllocPitch_v2(dptr, *pitch, width, height, elemsize): the device holds pitch x height.
        kind::MEM_ALLOC_PITCH => alloc(Space::DevicePtr, ev.out1.saturating_mul(a[3])),
        kind::MEM_CREATE => alloc(Space::MemHandle, a[1]),
        kind::ARRAY_CREATE => alloc(Space::Array, array_2d_bytes(&ev.desc)),
        kind::ARRAY_3D_CREATE => alloc(Space::Array, array_3d_bytes(&ev.desc, 1)),
        kind::MIPMAPPED_ARRAY_CREATE => alloc(Space::Array, array_3d_bytes(&ev.desc, a[2] as u32)),
        kind::MEM_FREE | kind::MEM_FREE_ASYNC => Some(Call::Free {
            space: Space::DevicePtr,
            handle: a[0],
        }),
        kind::MEM_RELEASE => Some(Call::Free {
            space: Space::MemHandle,
            handle: a[0],
        }),
        kind::ARRAY_DESTROY | kind::MIPMAPPED_ARRAY_DESTROY => Some(Call::Free {
            space: Space::Array,
            handle: a[0],
        }),
        // The device argument sits at a different position in each version.
        kind::CTX_CREATE_V2 => Some(Call::CtxCreate {
            ctx: ev.out0,
            device: a[2] as u32,
        }),
        kind::CTX_CREATE_V3 => Some(Call::CtxCreate {
            ctx: ev.out0,
            device: a[4] as u32,
        }),
        kind::CTX_CREATE_V4 => Some(Call::CtxCreate {
            ctx: ev.out0,
            device: a[3] as u32,
        }),
        kind::PRIMARY_CTX_RETAIN => Some(Call::CtxCreate {
            ctx: ev.out0,
            device: a[1] as u32,
        }),
        kind::PRIMARY_CTX_RELEASE => Some(Call::PrimaryCtxRelease {
            device: a[0] as u32,
        }),
        kind::CTX_DESTROY => Some(Call::CtxDestroy { ctx: a[0] }),
        _ => None,
    }
}

/// CUDA_ARRAY_DESCRIPTOR: { size_t Width; size_t Height; CUarray_format Format; unsigned NumChannels; }.
fn array_2d_bytes(d: &[u64; 5]) -> u64 {
    array_bytes(d[0], d[1], 0, d[2] as u32, (d[2] >> 32) as u32, 1)
}

/// CUDA_ARRAY3D_DESCRIPTOR: { size_t Width, Height, Depth; CUarray_format Format; unsigned NumChannels; unsigned
/// Flags; }.
fn array_3d_bytes(d: &[u64; 5], levels: u32) -> u64 {
    array_bytes(d[0], d[1], d[2], d[3] as u32, (d[3] >> 32) as u32, levels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_agent_ebpf_common::CALL_PROBES;

    fn ev(symbol: &str, args: [u64; 5]) -> CallEvent {
        let cookie = CALL_PROBES.iter().find(|(s, _)| *s == symbol).unwrap().1;
        CallEvent {
            cookie,
            args,
            out0: 0xdead_0000,
            ..Default::default()
        }
    }

    #[test]
    fn allocations_and_frees() {
        let e = ev("cuMemAlloc_v2", [0x7ff0, 1 << 20, 0, 0, 0]);
        assert_eq!(
            decode(&e),
            Some(Call::Alloc {
                space: Space::DevicePtr,
                handle: 0xdead_0000,
                bytes: 1 << 20
            })
        );
        let mut failed = e;
        failed.ret = 2; // CUDA_ERROR_OUT_OF_MEMORY
        assert_eq!(decode(&failed), None);
        let mut p = ev("cuMemAllocPitch_v2", [0x7ff0, 0x7ff8, 1000, 300, 4]);
        p.out1 = 1024;
        assert_eq!(
            decode(&p),
            Some(Call::Alloc {
                space: Space::DevicePtr,
                handle: 0xdead_0000,
                bytes: 1024 * 300
            })
        );
        assert_eq!(
            decode(&ev("cuMemFreeAsync_ptsz", [0xdead_0000, 0, 0, 0, 0])),
            Some(Call::Free {
                space: Space::DevicePtr,
                handle: 0xdead_0000
            })
        );
        assert_eq!(
            decode(&ev("cuMemCreate", [0x7ff0, 2 << 20, 0, 0, 0])),
            Some(Call::Alloc {
                space: Space::MemHandle,
                handle: 0xdead_0000,
                bytes: 2 << 20
            })
        );
        assert_eq!(
            decode(&ev("cuMemRelease", [0xdead_0000, 0, 0, 0, 0])),
            Some(Call::Free {
                space: Space::MemHandle,
                handle: 0xdead_0000
            })
        );
    }

    #[test]
    fn arrays_are_sized_from_their_descriptor() {
        let mut a = ev("cuArrayCreate_v2", [0x7ff0, 0x7ff8, 0, 0, 0]);
        a.desc = [1024, 512, 0x20 | (4 << 32), 0, 0]; // float4
        assert_eq!(
            decode(&a),
            Some(Call::Alloc {
                space: Space::Array,
                handle: 0xdead_0000,
                bytes: 1024 * 512 * 16
            })
        );
        let mut b = ev("cuArray3DCreate_v2", [0x7ff0, 0x7ff8, 0, 0, 0]);
        b.desc = [64, 64, 64, 0x01 | (1 << 32), 0];
        assert_eq!(
            decode(&b),
            Some(Call::Alloc {
                space: Space::Array,
                handle: 0xdead_0000,
                bytes: 64 * 64 * 64
            })
        );
        let mut m = ev("cuMipmappedArrayCreate", [0x7ff0, 0x7ff8, 3, 0, 0]);
        m.desc = [64, 64, 0, 0x01 | (1 << 32), 0];
        assert_eq!(
            decode(&m),
            Some(Call::Alloc {
                space: Space::Array,
                handle: 0xdead_0000,
                bytes: 64 * 64 + 32 * 32 + 16 * 16
            })
        );
    }

    #[test]
    fn contexts_take_the_device_from_each_version() {
        assert_eq!(
            decode(&ev("cuCtxCreate_v2", [0, 0, 3, 0, 0])),
            Some(Call::CtxCreate {
                ctx: 0xdead_0000,
                device: 3
            })
        );
        assert_eq!(
            decode(&ev("cuCtxCreate_v3", [0, 0, 0, 0, 2])),
            Some(Call::CtxCreate {
                ctx: 0xdead_0000,
                device: 2
            })
        );
        assert_eq!(
            decode(&ev("cuCtxCreate_v4", [0, 0, 0, 1, 0])),
            Some(Call::CtxCreate {
                ctx: 0xdead_0000,
                device: 1
            })
        );
        assert_eq!(
            decode(&ev("cuDevicePrimaryCtxRelease_v2", [5, 0, 0, 0, 0])),
            Some(Call::PrimaryCtxRelease { device: 5 })
        );
    }
}
