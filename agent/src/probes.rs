//! Loads the uprobe programs built from agent-ebpf and attaches them, once per libcuda file, for all
//! processes. Files are told apart by (device, inode), so one file reached by several paths (the host's
//! /usr/lib copy seen again through /proc/PID/root) is probed once and no call is counted twice.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope};
use aya::programs::UProbe;
use aya::Ebpf;
use vgpu_agent_ebpf_common::{
    CallEvent, CALL_PROBES, HANDED_OVER_MAPS, LAUNCH_SYMBOLS, MAP_DROPS, MAP_EVENTS, MAP_LAUNCHES,
    PROG_CALL_ENTRY, PROG_CALL_RETURN, PROG_LAUNCH,
};

/// The object agent/build.rs built (empty when the build machine had no bpfel toolchain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VGPU_EBPF_OBJECT_PATH"));
pub const BUILT_WITH: &str = env!("VGPU_EBPF_BUILT_WITH");

pub fn object() -> &'static [u8] {
    OBJECT
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachedFile {
    pub path: PathBuf,
    pub symbols: usize,
    pub launch_symbols: usize,
}

pub struct Probes {
    ebpf: Ebpf,
    launch_probes: bool,
    files: HashMap<(u64, u64), AttachedFile>,
    failed: HashSet<(u64, u64)>,
    logger: Option<aya_log::EbpfLogger<BpfLog>>,
}

/// Forwards aya-log records from the programs to tracing.
pub struct BpfLog;

impl log::Log for BpfLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        tracing::warn!(target: "ebpf", "{}", r.args());
    }
    fn flush(&self) {}
}

impl Probes {
    /// Loads the programs; with `pins`, the maps a successor takes over are pinned there (or taken over from
    /// a predecessor that pinned them).
    pub fn load(launch_probes: bool, pins: Option<&Path>) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this vgpu-agent was built without its eBPF programs (no bpfel toolchain at build time): run \
                 scripts/install-ebpf-toolchain.sh and rebuild"
            );
        }
        // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lifting it is harmless on newer ones.
        let rl = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads the struct we pass; failure only matters on old kernels and shows at load.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) };
        let mut loader = aya::EbpfLoader::new();
        if let Some(dir) = pins {
            for m in HANDED_OVER_MAPS {
                loader.map_pin_path(m, dir.join(m));
            }
        }
        let mut ebpf: Ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
        let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, BpfLog).ok();
        for name in [PROG_CALL_ENTRY, PROG_CALL_RETURN, PROG_LAUNCH] {
            let p: &mut UProbe = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load().with_context(|| {
                format!("loading {name} (is this root, on a kernel with uprobes?)")
            })?;
        }
        Ok(Self {
            ebpf,
            launch_probes,
            files: HashMap::new(),
            failed: HashSet::new(),
            logger,
        })
    }

    pub fn files(&self) -> Vec<AttachedFile> {
        self.files.values().cloned().collect()
    }

    pub fn launch_probes(&self) -> bool {
        self.launch_probes
    }

    /// Attaches every probe to `path` unless that file is already probed. Returns true when newly attached.
    pub fn attach_file(&mut self, path: &Path) -> Result<bool> {
        let m = std::fs::metadata(path).with_context(|| path.display().to_string())?;
        let id = (m.dev(), m.ino());
        if self.files.contains_key(&id) || self.failed.contains(&id) {
            return Ok(false);
        }
        let r = self.attach_all(path);
        match r {
            Ok((symbols, launch_symbols)) if symbols > 0 => {
                self.files.insert(
                    id,
                    AttachedFile {
                        path: path.to_path_buf(),
                        symbols,
                        launch_symbols,
                    },
                );
                Ok(true)
            }
            Ok(_) => {
                self.failed.insert(id);
                bail!("{}: none of the probed symbols found", path.display())
            }
            Err(e) => {
                self.failed.insert(id);
                Err(e)
            }
        }
    }

    fn attach_all(&mut self, path: &Path) -> Result<(usize, usize)> {
        let mut symbols = 0;
        for (sym, cookie) in CALL_PROBES {
            let mut ok = true;
            for prog in [PROG_CALL_ENTRY, PROG_CALL_RETURN] {
                let p: &mut UProbe = self.ebpf.program_mut(prog).context(prog)?.try_into()?;
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::Symbol(sym),
                    cookie: Some(*cookie),
                };
                if let Err(e) = p.attach(point, path, UProbeScope::AllProcesses) {
                    // Older drivers lack newer entry points (cuCtxCreate_v4, ...): skip those.
                    tracing::debug!("{}: {sym}: {e}", path.display());
                    ok = false;
                    break;
                }
            }
            symbols += ok as usize;
        }
        let mut launch_symbols = 0;
        if self.launch_probes {
            let p: &mut UProbe = self
                .ebpf
                .program_mut(PROG_LAUNCH)
                .context(PROG_LAUNCH)?
                .try_into()?;
            for sym in LAUNCH_SYMBOLS {
                launch_symbols += p.attach(*sym, path, UProbeScope::AllProcesses).is_ok() as usize;
            }
        }
        Ok((symbols, launch_symbols))
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        Ok(RingBuf::try_from(
            self.ebpf.take_map(MAP_EVENTS).context(MAP_EVENTS)?,
        )?)
    }

    /// Launches counted per tgid since the process was first seen (summed over CPUs).
    pub fn launch_counts(&self) -> HashMap<u32, u64> {
        let Some(m) = self.ebpf.map(MAP_LAUNCHES) else {
            return HashMap::new();
        };
        let Ok(map) = PerCpuHashMap::<_, u32, u64>::try_from(m) else {
            return HashMap::new();
        };
        map.iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| (k, v.iter().sum()))
            .collect()
    }

    pub fn forget_launches(&mut self, tgids: &[u32]) {
        if let Some(m) = self.ebpf.map_mut(MAP_LAUNCHES) {
            if let Ok(mut map) = PerCpuHashMap::<_, u32, u64>::try_from(m) {
                for t in tgids {
                    let _ = map.remove(t);
                }
            }
        }
    }

    pub fn drops(&self) -> u64 {
        let Some(m) = self.ebpf.map(MAP_DROPS) else {
            return 0;
        };
        let Ok(a) = PerCpuArray::<_, u64>::try_from(m) else {
            return 0;
        };
        a.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    pub fn flush_log(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }
}

/// Copies one ring buffer record into a CallEvent; None for a record of another size (a build mismatch).
pub fn parse_event(bytes: &[u8]) -> Option<CallEvent> {
    if bytes.len() < std::mem::size_of::<CallEvent>() {
        return None;
    }
    // SAFETY: CallEvent is repr(C) plain integers, valid for any bit pattern; the length is checked above and
    // read_unaligned makes no alignment assumption about the ring buffer's bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const CallEvent) })
}

/// libcuda files of the host driver, in the places drivers and container toolkits install them.
pub fn host_libcuda_candidates() -> Vec<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib64/libcuda.so.1",
        "/usr/lib/libcuda.so.1",
        "/usr/local/nvidia/lib64/libcuda.so.1",
        "/usr/local/cuda/compat/libcuda.so.1",
        "/usr/lib/aarch64-linux-gnu/libcuda.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.exists())
    .collect()
}
