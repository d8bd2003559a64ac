//! Loads the uprobe programs built from agent-ebpf and attaches them, once per libcuda file, for all
//! processes. Files are told apart by (device, inode), so one file reached by several paths (the host's
//! /usr/lib copy seen again through /proc/PID/root) is probed once and no call is counted twice.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::links::FdLink;
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
    /// This build's pin directory on bpffs, when pinning.
    pins: Option<PathBuf>,
    adopted: usize,
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
            pins: pins.map(Path::to_path_buf),
            adopted: 0,
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
        let r = self.attach_all(path, id);
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

    /// Where the links of the file `id` are pinned: `<pins>/links/<dev>_<ino>/`.
    fn links_dir(&self, id: (u64, u64)) -> Option<PathBuf> {
        self.pins
            .as_ref()
            .map(|d| d.join("links").join(format!("{}_{}", id.0, id.1)))
    }

    /// Attaches `prog` at `point`; with `pin`, the link is pinned there so it outlives this process (and the
    /// next agent adopts it). A link that cannot be pinned is attached again, held by this process.
    fn attach_one(
        &mut self,
        prog: &'static str,
        point: UProbeAttachPoint<'_>,
        path: &Path,
        pin: Option<PathBuf>,
    ) -> Result<()> {
        let p: &mut UProbe = self.ebpf.program_mut(prog).context(prog)?.try_into()?;
        let location = match &point.location {
            UProbeAttachLocation::Symbol(s) => *s,
            _ => "",
        };
        let cookie = point.cookie;
        let id = p.attach(point, path, UProbeScope::AllProcesses)?;
        let Some(pin) = pin else { return Ok(()) };
        let pinned = p
            .take_link(id)
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok(FdLink::try_from(l)?))
            .and_then(|l| Ok(l.pin(&pin)?));
        if let Err(e) = pinned {
            tracing::warn!(
                "{}: cannot pin {location}: {e:#}; held by this agent only",
                pin.display()
            );
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::Symbol(location),
                cookie,
            };
            p.attach(point, path, UProbeScope::AllProcesses)?;
        }
        Ok(())
    }

    /// Takes over the links a previous agent of this build pinned for this file: (call symbols, launch
    /// symbols), or None when there are none. Launch links follow this agent's `--launch-probes`.
    fn adopt(&mut self, dir: &Path, path: &Path) -> Result<Option<(usize, usize)>> {
        let names: Vec<String> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(_) => return Ok(None),
        };
        let (symbols, launch) = pinned_probes(&names);
        if symbols == 0 {
            return Ok(None);
        }
        let launch_symbols = if self.launch_probes {
            if launch.is_empty() {
                self.attach_launch(path, Some(dir))?
            } else {
                launch.len()
            }
        } else {
            for n in launch {
                // Unpinning the last reference detaches the probe.
                let _ = std::fs::remove_file(dir.join(n));
            }
            0
        };
        self.adopted += 1;
        Ok(Some((symbols, launch_symbols)))
    }

    fn attach_launch(&mut self, path: &Path, pins: Option<&Path>) -> Result<usize> {
        let mut n = 0;
        for sym in LAUNCH_SYMBOLS {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::Symbol(sym),
                cookie: None,
            };
            let pin = pins.map(|d| d.join(format!("launch-{sym}")));
            n += self.attach_one(PROG_LAUNCH, point, path, pin).is_ok() as usize;
        }
        Ok(n)
    }

    fn attach_all(&mut self, path: &Path, id: (u64, u64)) -> Result<(usize, usize)> {
        let dir = self.links_dir(id);
        if let Some(dir) = &dir {
            if let Some(counts) = self.adopt(dir, path)? {
                return Ok(counts);
            }
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        }
        let mut symbols = 0;
        for (sym, cookie) in CALL_PROBES {
            let mut ok = true;
            for (prog, kind) in [(PROG_CALL_ENTRY, "entry"), (PROG_CALL_RETURN, "return")] {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::Symbol(sym),
                    cookie: Some(*cookie),
                };
                let pin = dir.as_ref().map(|d| d.join(format!("{sym}-{kind}")));
                if let Err(e) = self.attach_one(prog, point, path, pin) {
                    // Older drivers lack newer entry points (cuCtxCreate_v4, ...): skip those.
                    tracing::debug!("{}: {sym}: {e}", path.display());
                    ok = false;
                    break;
                }
            }
            symbols += ok as usize;
        }
        let launch_symbols = if self.launch_probes {
            self.attach_launch(path, dir.as_deref())?
        } else {
            0
        };
        Ok((symbols, launch_symbols))
    }

    /// How many files' probes were taken over from a previous agent's pins.
    pub fn adopted(&self) -> usize {
        self.adopted
    }

    /// Unpins the links of files not probed now (a driver upgraded in place leaves its old inode's).
    pub fn prune_pinned_links(&self) {
        let Some(root) = self.pins.as_ref().map(|d| d.join("links")) else {
            return;
        };
        let keep: HashSet<String> = self.files.keys().map(|(d, i)| format!("{d}_{i}")).collect();
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if !keep.contains(e.file_name().to_string_lossy().as_ref()) {
                tracing::info!(
                    "unpinning probes of a file no longer probed: {}",
                    e.path().display()
                );
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
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

/// In one file's link directory: the symbols pinned with both their entry and return probe, and the names
/// of the pinned launch probes.
fn pinned_probes(names: &[String]) -> (usize, Vec<&String>) {
    let symbols = names
        .iter()
        .filter_map(|n| n.strip_suffix("-entry"))
        .filter(|sym| names.iter().any(|n| *n == format!("{sym}-return")))
        .count();
    let launch = names.iter().filter(|n| n.starts_with("launch-")).collect();
    (symbols, launch)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_symbols_pinned_with_both_probes_count() {
        let names: Vec<String> = [
            "cuMemAlloc_v2-entry",
            "cuMemAlloc_v2-return",
            "cuMemFree_v2-entry",
            "launch-cuLaunchKernel",
            "launch-cuGraphLaunch",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (symbols, launch) = pinned_probes(&names);
        assert_eq!(symbols, 1, "cuMemFree_v2 lacks its return probe");
        assert_eq!(launch.len(), 2);
        assert_eq!(pinned_probes(&[]).0, 0);
    }
}
