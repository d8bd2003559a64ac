//! Which files a process maps are a libcuda, and which of those are the host driver's.
//!
//! A file is a libcuda by what it exports (`cuInit` or `cuMemAlloc_v2` in its dynamic symbol table), not by
//! its name: a renamed copy is still one. Only the host driver's files (by device and inode, from the host's
//! driver directories and `--libcuda`) are probed and believed: a tenant's own libcuda could report any call
//! it likes (a `cuMemFree_v2` that frees nothing), so a process mapping one is flagged instead, and its
//! memory is taken from NVML (docs/security.md). Every file is reached through `/proc/PID/map_files/`, which
//! names exactly the mapped file (no path inside the container is followed), opened without blocking, and
//! read a bounded amount.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The host's driver directories: where drivers and container toolkits install libcuda on the host.
pub const HOST_DRIVER_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/nvidia/lib64",
    "/usr/local/cuda/compat",
    "/usr/lib/aarch64-linux-gnu",
];

/// Symbols only a CUDA driver library (or something posing as one) exports.
const CUDA_SYMBOLS: &[&[u8]] = &[b"cuInit", b"cuMemAlloc_v2"];

/// What a mapped file is to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The host driver's libcuda: probed, its events believed.
    HostDriver,
    /// The host's own shim (libvgpu.so exports the CUDA entry points it wraps): neither probed nor flagged.
    HostShim,
    /// Exports CUDA entry points but is not a host file: flagged.
    Private,
    NotCuda,
}

/// One executable file mapping of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// `start-end` as in /proc/PID/maps (the name of its /proc/PID/map_files entry).
    pub range: String,
    /// Device (as `major:minor` hex in maps) and inode, as the maps line gives them.
    pub maps_id: (String, u64),
    /// The path as the process sees it (for messages only).
    pub name: String,
}

/// Bytes of /proc/PID/maps read at most (a process with huge numbers of mappings is cut there).
const MAX_MAPS: u64 = 8 << 20;

/// The executable file mappings of `pid`, one per file.
pub fn executable_mappings(proc_root: &Path, pid: u32) -> Vec<Mapping> {
    let Ok(f) = File::open(proc_root.join(format!("{pid}/maps"))) else {
        return vec![];
    };
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_MAPS), &mut text);
    parse_maps(&text)
}

pub fn parse_maps(text: &str) -> Vec<Mapping> {
    let mut seen = HashSet::new();
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(6, ' ');
            let range = f.next()?;
            let perms = f.next()?;
            let _offset = f.next()?;
            let dev = f.next()?;
            let ino: u64 = f.next()?.parse().ok()?;
            let name = f.next().unwrap_or("").trim_start();
            (perms.contains('x') && ino != 0 && name.starts_with('/')).then(|| Mapping {
                range: range.to_string(),
                maps_id: (dev.to_string(), ino),
                name: name.to_string(),
            })
        })
        .filter(|m| seen.insert(m.maps_id.clone()))
        .collect()
}

/// A file (opened without following symlinks or blocking) that exports a CUDA entry point, read with
/// bounded `pread`s. Anything that is not a readable 64-bit little-endian ELF is not a libcuda.
pub fn exports_cuda(f: &File) -> bool {
    elf::exports_any(f, CUDA_SYMBOLS).unwrap_or(false)
}

/// Opens a mapped file of a process: exactly the file the kernel mapped, whatever its path or name now.
pub fn open_mapped(proc_root: &Path, pid: u32, range: &str) -> std::io::Result<File> {
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(proc_root.join(format!("{pid}/map_files/{range}")))?;
    if !f.metadata()?.file_type().is_file() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// What one scan of the processes found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Processes mapping the host driver's libcuda.
    pub users: Vec<u32>,
    /// Processes mapping a libcuda that is not the host's, with its path as they see it.
    pub private: HashMap<u32, String>,
}

/// The host's files by (device, inode), and what each mapped file turned out to be.
#[derive(Debug, Default)]
pub struct Identities {
    host_driver: HashMap<(u64, u64), PathBuf>,
    host_shim: HashSet<(u64, u64)>,
    /// By the maps line's (device, inode): a file is classified once.
    known: HashMap<(String, u64), Kind>,
    /// /proc/PID/map_files could not be opened for lack of privilege (said once).
    denied: bool,
}

fn file_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

impl Identities {
    /// Re-reads the host's driver files (`libcuda.so*` in the driver directories, and `explicit`) and the
    /// shim's; returns the driver files' paths, to probe.
    pub fn refresh_host(&mut self, explicit: &[PathBuf], shims: &[PathBuf]) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = explicit.to_vec();
        for d in HOST_DRIVER_DIRS {
            let Ok(rd) = std::fs::read_dir(d) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("libcuda.so") {
                    files.push(e.path());
                }
            }
        }
        let before = self.host_driver.len() + self.host_shim.len();
        for f in &files {
            if let Some(id) = file_id(f) {
                self.host_driver.entry(id).or_insert_with(|| f.clone());
            }
        }
        self.host_shim
            .extend(shims.iter().filter_map(|p| file_id(p)));
        if self.host_driver.len() + self.host_shim.len() != before {
            // A file classified before may be the host's now (a driver installed meanwhile).
            self.known.clear();
        }
        let mut paths: Vec<PathBuf> = self.host_driver.values().cloned().collect();
        paths.sort();
        paths
    }

    /// Classifies (once) a file `pid` maps.
    pub fn classify(&mut self, proc_root: &Path, pid: u32, m: &Mapping) -> Kind {
        if let Some(k) = self.known.get(&m.maps_id) {
            return *k;
        }
        let f = match open_mapped(proc_root, pid, &m.range) {
            Ok(f) => f,
            Err(e) => {
                if e.kind() == ErrorKind::PermissionDenied && !self.denied {
                    self.denied = true;
                    tracing::warn!(
                        "cannot open /proc/PID/map_files ({e}): private libcuda files go unnoticed; run the \
                         agent with CAP_SYS_ADMIN (privileged)"
                    );
                }
                return Kind::NotCuda; // gone, or not ours to open: asked again next scan
            }
        };
        let Ok(meta) = f.metadata() else {
            return Kind::NotCuda;
        };
        let id = (meta.dev(), meta.ino());
        let kind = if self.host_driver.contains_key(&id) {
            Kind::HostDriver
        } else if self.host_shim.contains(&id) {
            Kind::HostShim
        } else if exports_cuda(&f) {
            Kind::Private
        } else {
            Kind::NotCuda
        };
        self.known.insert(m.maps_id.clone(), kind);
        kind
    }

    /// Every process's mappings classified.
    pub fn scan(&mut self, proc_root: &Path) -> Scan {
        let mut out = Scan::default();
        for pid in crate::ebpf::procs::pids(proc_root) {
            let mut host = false;
            for m in executable_mappings(proc_root, pid) {
                match self.classify(proc_root, pid, &m) {
                    Kind::HostDriver => host = true,
                    Kind::Private => {
                        out.private.entry(pid).or_insert(m.name);
                    }
                    Kind::HostShim | Kind::NotCuda => {}
                }
            }
            if host {
                out.users.push(pid);
            }
        }
        out
    }
}

/// The host's shim files: beside this binary, and where the device plugin installs it.
pub fn host_shims() -> Vec<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("libvgpu.so")));
    beside
        .into_iter()
        .chain([Path::new(vgpu_contract::env::CONTAINER_DIR).join("libvgpu.so")])
        .collect()
}

/// Just enough of ELF64 (little-endian) to read a file's dynamic symbol table, every read bounded.
mod elf {
    use super::*;

    /// Tables larger than this are not a shared library's (libcuda's are well under 1 MiB).
    const MAX_TABLE: u64 = 32 << 20;

    fn read(f: &File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
        if len > MAX_TABLE {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "table too large",
            ));
        }
        let mut b = vec![0; len as usize];
        f.read_exact_at(&mut b, off)?;
        Ok(b)
    }

    fn u16_at(b: &[u8], o: usize) -> u64 {
        b.get(o..o + 2)
            .map_or(0, |x| u16::from_le_bytes(x.try_into().unwrap()) as u64)
    }
    fn u32_at(b: &[u8], o: usize) -> u64 {
        b.get(o..o + 4)
            .map_or(0, |x| u32::from_le_bytes(x.try_into().unwrap()) as u64)
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        b.get(o..o + 8)
            .map_or(0, |x| u64::from_le_bytes(x.try_into().unwrap()))
    }

    fn name_at(strtab: &[u8], off: usize) -> &[u8] {
        let s = strtab.get(off..).unwrap_or(&[]);
        &s[..s.iter().position(|c| *c == 0).unwrap_or(s.len())]
    }

    pub fn exports_any(f: &File, names: &[&[u8]]) -> std::io::Result<bool> {
        let h = read(f, 0, 64)?;
        // 64-bit, little-endian ELF (every platform the driver ships for).
        if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
            return Ok(false);
        }
        let (shoff, shentsize, shnum) = (u64_at(&h, 0x28), u16_at(&h, 0x3a), u16_at(&h, 0x3c));
        if shnum > 0 && shentsize == 64 {
            let sh = read(f, shoff, shnum * 64)?;
            let sec = |i: u64| &sh[(i * 64) as usize..(i * 64 + 64) as usize];
            for i in 0..shnum {
                let s = sec(i);
                if u32_at(s, 4) != 11 {
                    continue; // SHT_DYNSYM
                }
                let link = u32_at(s, 40);
                if link >= shnum {
                    return Ok(false);
                }
                let st = sec(link);
                let strtab = read(f, u64_at(st, 24), u64_at(st, 32))?;
                let syms = read(f, u64_at(s, 24), u64_at(s, 32))?;
                return Ok(syms.chunks_exact(24).any(|sym| {
                    // Defined (section index not 0): exported, not merely imported.
                    u16_at(sym, 6) != 0
                        && names.contains(&name_at(&strtab, u32_at(sym, 0) as usize))
                }));
            }
        }
        // No section headers (stripped with sstrip): the loader's view, PT_DYNAMIC's string table. That
        // cannot tell an export from an import, so it errs towards "is a libcuda".
        let (phoff, phentsize, phnum) = (u64_at(&h, 0x20), u16_at(&h, 0x36), u16_at(&h, 0x38));
        if phentsize != 56 || phnum == 0 {
            return Ok(false);
        }
        let ph = read(f, phoff, phnum * 56)?;
        let segs: Vec<&[u8]> = ph.chunks_exact(56).collect();
        let to_off = |vaddr: u64| {
            segs.iter()
                .filter(|p| u32_at(p, 0) == 1) // PT_LOAD
                .find(|p| vaddr >= u64_at(p, 16) && vaddr - u64_at(p, 16) < u64_at(p, 32))
                .map(|p| vaddr - u64_at(p, 16) + u64_at(p, 8))
        };
        let Some(dynamic) = segs.iter().find(|p| u32_at(p, 0) == 2) else {
            return Ok(false);
        };
        let dyns = read(f, u64_at(dynamic, 8), u64_at(dynamic, 32).min(1 << 16))?;
        let (mut strtab, mut strsz) = (None, 0);
        for d in dyns.chunks_exact(16) {
            match u64_at(d, 0) {
                5 => strtab = to_off(u64_at(d, 8)),
                10 => strsz = u64_at(d, 8),
                _ => {}
            }
        }
        let Some(off) = strtab else { return Ok(false) };
        let s = read(f, off, strsz)?;
        Ok(s.split(|c| *c == 0).any(|n| names.contains(&n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_give_executable_file_mappings_once_each() {
        let m = parse_maps(
            "7f00-7f10 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1\n\
             7f10-7f20 r--p 00010000 08:01 123 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1\n\
             7f20-7f30 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1\n\
             7f30-7f40 r-xp 00000000 08:01 124 /opt/app/lib with space.so (deleted)\n\
             7f40-7f50 rw-p 00000000 00:00 0 \n\
             7f50-7f60 r-xp 00000000 00:00 0 [vdso]\n",
        );
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].range, "7f00-7f10");
        assert_eq!(m[0].maps_id, ("08:01".into(), 123));
        assert_eq!(m[1].name, "/opt/app/lib with space.so (deleted)");
    }

    fn gcc_so(dir: &Path, name: &str, src: &str, extra: &[&str]) -> PathBuf {
        let c = dir.join(format!("{name}.c"));
        std::fs::write(&c, src).unwrap();
        let out = dir.join(name);
        let st = std::process::Command::new("gcc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&out)
            .arg(&c)
            .args(extra)
            .status()
            .expect("gcc");
        assert!(st.success());
        out
    }

    #[test]
    fn a_library_is_a_libcuda_by_its_exports_not_its_name() {
        let d = std::env::temp_dir().join(format!("vgpu-elf-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let cuda = gcc_so(&d, "libfoo.so", "int cuMemAlloc_v2(void){return 0;}", &[]);
        let importer = gcc_so(
            &d,
            "libbar.so",
            "extern int cuInit(unsigned); int f(void){return cuInit(0);}",
            &[],
        );
        let open = |p: &Path| File::open(p).unwrap();
        assert!(exports_cuda(&open(&cuda)), "exports cuMemAlloc_v2");
        assert!(!exports_cuda(&open(&importer)), "only imports cuInit");
        assert!(!exports_cuda(&open(Path::new("/proc/self/exe"))));
        // Without section headers the loader's string table still names it.
        let mut bytes = std::fs::read(&cuda).unwrap();
        bytes[0x3c..0x3e].copy_from_slice(&0u16.to_le_bytes());
        let stripped = d.join("libstripped.so");
        std::fs::write(&stripped, bytes).unwrap();
        assert!(exports_cuda(&open(&stripped)));
        // Garbage and short files are simply not a libcuda.
        std::fs::write(d.join("junk"), b"\x7fELF\x02\x01").unwrap();
        assert!(!exports_cuda(&open(&d.join("junk"))));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_private_copy_is_flagged_and_the_host_file_is_not() {
        let d = std::env::temp_dir().join(format!("vgpu-ids-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let host = gcc_so(&d, "libcuda.so.1", "int cuInit(unsigned f){return 0;}", &[]);
        let copy = d.join("libnotcuda.so");
        std::fs::copy(&host, &copy).unwrap();
        let mut ids = Identities::default();
        ids.refresh_host(std::slice::from_ref(&host), &[]);
        // This process maps neither: classify through a stand-in /proc whose map_files point at them.
        let proc_root = d.join("proc");
        let me = 7u32;
        std::fs::create_dir_all(proc_root.join("7/map_files")).unwrap();
        std::os::unix::fs::symlink(&host, proc_root.join("7/map_files/1-2")).unwrap();
        std::os::unix::fs::symlink(&copy, proc_root.join("7/map_files/3-4")).unwrap();
        let m = |range: &str, ino: u64, name: &str| Mapping {
            range: range.into(),
            maps_id: ("08:01".into(), ino),
            name: name.into(),
        };
        assert_eq!(
            ids.classify(&proc_root, me, &m("1-2", 1, "/x/libcuda.so.1")),
            Kind::HostDriver
        );
        assert_eq!(
            ids.classify(&proc_root, me, &m("3-4", 2, "/x/libnotcuda.so")),
            Kind::Private,
            "a copy is another inode"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
