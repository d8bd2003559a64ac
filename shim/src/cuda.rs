//! The few CUDA driver and NVML types and constants the shim needs (from cuda.h / nvml.h).

use std::ffi::{c_int, c_uint, c_void};
use vgpu_contract::cuda_arrays::array_bytes;

pub type CUresult = c_int;
pub type CUdevice = c_int;
pub type CUdeviceptr = u64;
pub type CUstream = *mut c_void;
pub type CUfunction = *mut c_void;
pub type CUcontext = *mut c_void;
pub type NvmlReturn = c_int;
pub type NvmlDevice = *mut c_void;

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_NOT_PERMITTED: CUresult = 800;
pub const NVML_SUCCESS: NvmlReturn = 0;
pub const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
pub const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;

/// `CUDA_ARRAY_DESCRIPTOR`.
#[repr(C)]
pub struct ArrayDescriptor {
    pub width: usize,
    pub height: usize,
    pub format: c_int,
    pub num_channels: c_uint,
}

/// `CUDA_ARRAY3D_DESCRIPTOR`.
#[repr(C)]
pub struct Array3dDescriptor {
    pub width: usize,
    pub height: usize,
    pub depth: usize,
    pub format: c_int,
    pub num_channels: c_uint,
    pub flags: c_uint,
}

impl ArrayDescriptor {
    /// Device bytes of the array it describes (contract::cuda_arrays' rule).
    pub fn bytes(&self) -> u64 {
        array_bytes(
            self.width as u64,
            self.height as u64,
            0,
            self.format as u32,
            self.num_channels,
            1,
        )
    }
}

impl Array3dDescriptor {
    /// Device bytes of the array it describes with `levels` mipmap levels, every level counted.
    pub fn bytes(&self, levels: c_uint) -> u64 {
        array_bytes(
            self.width as u64,
            self.height as u64,
            self.depth as u64,
            self.format as u32,
            self.num_channels,
            levels,
        )
    }
}

/// The head of `CUmemAllocationProp`: type, requested handle types, then `CUmemLocation { type, id }`.
#[repr(C)]
pub struct MemAllocationPropHead {
    pub alloc_type: c_int,
    pub handle_types: c_int,
    pub location_type: c_int,
    pub location_id: c_int,
}
pub const CU_MEM_LOCATION_TYPE_DEVICE: c_int = 1;

/// `nvmlMemory_t`.
#[repr(C)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct NvmlMemoryV2 {
    pub version: c_uint,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlProcessInfo_t` (v2/v3 layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct NvmlProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" from the 16 bytes of a `CUuuid`, as NVML prints it.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_format() {
        let b = [
            0x85, 0x9b, 0x87, 0x2c, 0x0b, 0xa2, 0x97, 0xb0, 0x10, 0xb4, 0x8b, 0x71, 0x85, 0xc5,
            0x50, 0x39,
        ];
        assert_eq!(format_uuid(&b), "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039");
    }
}
