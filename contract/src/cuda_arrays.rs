//! How many bytes a CUDA array holds, from its descriptor: the shim charges it and the agent's uprobes count
//! it, and the two must agree or the agent would flag every array as a disagreement.

/// Bytes per channel of a `CUarray_format` (cuda.h values); unknown formats count 4 so they are not missed.
pub fn format_bytes(format: u32) -> u64 {
    match format {
        0x01 | 0x08 => 1,        // UNSIGNED_INT8, SIGNED_INT8
        0x02 | 0x09 | 0x10 => 2, // UNSIGNED_INT16, SIGNED_INT16, HALF
        _ => 4,                  // (UN)SIGNED_INT32, FLOAT and the rest
    }
}

/// Bytes of an array `width` x `height` x `depth` (0 means the dimension is absent) with `levels` mip levels
/// (0 or 1: a plain array), each level half the previous one in every dimension.
pub fn array_bytes(
    width: u64,
    height: u64,
    depth: u64,
    format: u32,
    channels: u32,
    levels: u32,
) -> u64 {
    let texel = format_bytes(format).saturating_mul(channels.max(1) as u64);
    (0..levels.clamp(1, 32))
        .map(|l| {
            let dim = |x: u64| (x.max(1) >> l).max(1);
            dim(width)
                .saturating_mul(dim(height))
                .saturating_mul(dim(depth))
                .saturating_mul(texel)
        })
        .fold(0u64, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(array_bytes(1024, 0, 0, 0x20, 4, 0), 16384, "1D float4");
        assert_eq!(array_bytes(1024, 512, 0, 0x20, 4, 1), 1024 * 512 * 16);
        assert_eq!(array_bytes(16, 16, 16, 0x01, 1, 1), 4096);
        assert_eq!(
            array_bytes(64, 64, 0, 0x01, 1, 3),
            64 * 64 + 32 * 32 + 16 * 16
        );
        assert_eq!(
            array_bytes(u64::MAX, 2, 0, 0x20, 4, 1),
            u64::MAX,
            "saturates"
        );
    }
}
