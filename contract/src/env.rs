//! Environment variables of the container contract. Names match HAMi so pods written for it work unchanged.

/// GPU UUIDs (or indices) the container runtime exposes, comma separated.
pub const NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
/// Memory ceiling for every visible device (`4000m`, `4g`, plain bytes).
pub const MEMORY_LIMIT_ALL: &str = "CUDA_DEVICE_MEMORY_LIMIT";
/// Prefix of the per-device ceiling: `CUDA_DEVICE_MEMORY_LIMIT_<cuda ordinal>`; it wins over [`MEMORY_LIMIT_ALL`].
pub const MEMORY_LIMIT_PREFIX: &str = "CUDA_DEVICE_MEMORY_LIMIT_";
/// Compute share in percent of the card; 0 or 100 mean no cap.
pub const SM_LIMIT: &str = "CUDA_DEVICE_SM_LIMIT";
/// The container's shared-cache file, charged by all of its processes.
pub const SHARED_CACHE: &str = "CUDA_DEVICE_MEMORY_SHARED_CACHE";
/// `default`, `force` or `disable` (set by the user).
pub const CORE_POLICY: &str = "GPU_CORE_UTILIZATION_POLICY";
/// HAMi's switch to skip the shim. vgpu ignores it inside a container that has a limits file (fail closed).
pub const DISABLE_CONTROL: &str = "CUDA_DISABLE_CONTROL";
/// CUDA's own device filter; the shim uses it to map NVML devices to CUDA ordinals.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// vgpu's own: directory of the per-card coordination files shared by every slice on the node
/// (pacing phases and activity). Default [`DEFAULT_CARD_DIR`].
pub const CARD_DIR: &str = "VGPU_CARD_DIR";
/// vgpu's own: path of a limits file off Kubernetes (`vgpu-agent exec`, tests). Ignored whenever
/// [`DEFAULT_LIMITS_FILE`] exists: inside a container the mounted file is the root of trust, and a tenant
/// pointing elsewhere must not escape it (see [`crate::container_dir`]).
pub const LIMITS_FILE: &str = "VGPU_LIMITS_FILE";
/// vgpu's own: how long a shim waits for a pending limits file before it refuses every allocation, in
/// milliseconds. It may only shorten [`crate::container_dir::PENDING_WAIT_MS`] (a shorter wait only fails the
/// container's own process sooner).
pub const LIMITS_PENDING_WAIT_MS: &str = "VGPU_LIMITS_PENDING_WAIT_MS";
/// vgpu's own: length of a card's pacing period in milliseconds (10 to 5000; default
/// [`DEFAULT_PACING_PERIOD_MS`]). A slice joining a card no other container is using records it in the card
/// file; every other slice on that card follows the recorded one, so windows never overlap.
pub const PACING_PERIOD_MS: &str = "VGPU_PACING_PERIOD_MS";
/// vgpu's own: `off`, `error`, `warn` (default) or `info`: how much the shim writes to stderr.
pub const LOG_LEVEL: &str = "VGPU_LOG";

/// Where Allocate mounts the container's directory (cache file and limits file live in it).
pub const CONTAINER_DIR: &str = "/usr/local/vgpu";
pub const DEFAULT_LIMITS_FILE: &str = "/usr/local/vgpu/limits";
pub const DEFAULT_CARD_DIR: &str = "/var/run/vgpu/cards";
/// Half a second, chosen on the H100 (`integration/gpu/period_sweep.sh`): windows this long let the card's
/// power limit act inside them as under full load, so a slice's throughput matches its time share (30% slice:
/// 0.319 of unlimited at 500 ms, 0.368 at 50 ms, where it runs at boost clock); and NVML, which there reports
/// a ~120 ms stretch of every 200 ms, sees every phase of a 500 ms period within any 1 s (at 1000 ms it read
/// 36% for a 30% slice). The price: a held launch may wait up to the rest of the period (350 ms at 30%).
pub const DEFAULT_PACING_PERIOD_MS: u64 = 500;
/// HAMi-core's default when no cache path is given. Used only off Kubernetes; vgpu-agent exec always sets one.
pub const DEFAULT_SHARED_CACHE: &str = "/tmp/vgpu.cache";
