//! A "container" as a host process: the command from the pod spec (the image is ignored), exactly the
//! environment the kubelet would give it, Allocate's mounts bind-mounted in a mount namespace of its own, and
//! its own cgroup, joined before exec so nothing it runs escapes.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};

/// One bind mount, as Allocate's `Mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    pub read_only: bool,
}

/// Everything needed to start the process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    /// In order; a later entry replaces an earlier one of the same name.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub mounts: Vec<MountSpec>,
    /// The container's cgroup directory (created already); None runs it in the harness's cgroup.
    pub cgroup: Option<PathBuf>,
    /// Whether to apply the mounts in a new mount namespace (needs root).
    pub mount_ns: bool,
    /// Start through this `kubelet-harness` (as `pid1 -- argv`) in a new pid namespace; needs `mount_ns`.
    pub pid_ns_helper: Option<PathBuf>,
    /// stdout and stderr go here (appended).
    pub log: PathBuf,
}

/// The environment with later duplicates winning, as the container runtime builds it.
pub fn effective_env(env: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in env {
        match out.iter_mut().find(|(ok, _)| ok == k) {
            Some(e) => e.1 = v.clone(),
            None => out.push((k.clone(), v.clone())),
        }
    }
    out
}

fn cstr(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", p.display()))
}

/// What a missing mount target needs inside the container's mount namespace.
#[derive(Debug, Default, PartialEq, Eq)]
struct Shadow {
    /// Empty host directories covered with a tmpfs of the container's own first.
    tmpfs: Vec<PathBuf>,
    /// Then created on those tmpfs, in order: (path, is a directory).
    create: Vec<(PathBuf, bool)>,
}

/// Makes a missing mount target exist without leaving files on the host, as a container runtime makes them in
/// the container's own root filesystem. A target under a missing directory (`/usr/local/vgpu/limits` on a host
/// without `/usr/local/vgpu`) gets that directory created empty on the host (an empty directory changes nothing
/// there: the shim looks for the file), covered by a tmpfs inside the namespace, and the target created on that
/// tmpfs. A target whose parent is an empty directory is made the same way. Only a target directly in a
/// non-empty host directory (`/etc/ld.so.preload`) is created on the host, empty (an empty preload list loads
/// nothing). Nothing that exists is touched.
fn ensure_target(m: &MountSpec, earlier: &[MountSpec], shadow: &mut Shadow) -> anyhow::Result<()> {
    let target = host_view(&m.container_path, earlier);
    let src = std::fs::metadata(&m.host_path).with_context(|| {
        format!(
            "mount source {} (for {}) does not exist on the host: the device plugin's Allocate answer names it",
            m.host_path.display(),
            m.container_path.display()
        )
    })?;
    if std::fs::symlink_metadata(&target).is_ok()
        || shadow.create.iter().any(|(p, _)| *p == target)
    {
        return Ok(());
    }
    let remapped = target != m.container_path;
    // Already under a tmpfs of ours: create it there.
    if let Some(base) = shadow.tmpfs.iter().find(|d| target.starts_with(d)).cloned() {
        push_path(shadow, &base, &target, src.is_dir());
        return Ok(());
    }
    if !remapped {
        // The topmost missing ancestor, if any.
        let mut missing_top: Option<PathBuf> = None;
        let mut a = target.parent();
        while let Some(dir) = a {
            if std::fs::symlink_metadata(dir).is_ok() {
                break;
            }
            missing_top = Some(dir.to_path_buf());
            a = dir.parent();
        }
        let base = match missing_top {
            Some(top) => {
                std::fs::create_dir_all(&top)
                    .with_context(|| format!("creating the mount point {}", top.display()))?;
                Some(top)
            }
            None => target
                .parent()
                .filter(|p| {
                    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none()) && *p != Path::new("/")
                })
                .map(Path::to_path_buf),
        };
        if let Some(base) = base {
            shadow.tmpfs.push(base.clone());
            push_path(shadow, &base, &target, src.is_dir());
            return Ok(());
        }
    }
    if src.is_dir() {
        std::fs::create_dir_all(&target)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map(drop)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
    }
    .with_context(|| {
        format!(
            "creating the mount target {} for {}",
            target.display(),
            m.host_path.display()
        )
    })
}

/// Adds `target` and the directories between `base` and it to what the child creates on the tmpfs at `base`.
fn push_path(shadow: &mut Shadow, base: &Path, target: &Path, is_dir: bool) {
    let Ok(rest) = target.strip_prefix(base) else {
        return;
    };
    let mut cur = base.to_path_buf();
    let parts: Vec<_> = rest.components().collect();
    for (i, c) in parts.iter().enumerate() {
        cur.push(c);
        let dir = i + 1 < parts.len() || is_dir;
        if !shadow.create.iter().any(|(p, _)| *p == cur) {
            shadow.create.push((cur.clone(), dir));
        }
    }
}

/// Where `path` lies on the host once `earlier` mounts are in place: under the deepest of them that covers
/// it, else the path itself.
fn host_view(path: &Path, earlier: &[MountSpec]) -> PathBuf {
    earlier
        .iter()
        .filter_map(|m| Some((m, path.strip_prefix(&m.container_path).ok()?)))
        .max_by_key(|(m, _)| m.container_path.components().count())
        .map(|(m, rest)| m.host_path.join(rest))
        .unwrap_or_else(|| path.to_path_buf())
}

/// Parents before children, as the runtime orders mounts (a mount of `/a` must not hide one of `/a/b`).
fn mount_order(mounts: &[MountSpec]) -> Vec<MountSpec> {
    let mut v = mounts.to_vec();
    v.sort_by_key(|m| m.container_path.components().count());
    v
}

struct PreparedMount {
    src: CString,
    dst: CString,
    read_only: bool,
}

/// Starts the process. Errors say which step failed; the pre-exec steps report the errno of the step.
pub fn spawn(spec: &ProcessSpec) -> anyhow::Result<tokio::process::Child> {
    if spec.argv.is_empty() {
        bail!("the container has no command: the harness ignores images, so the pod must give `command`");
    }
    let argv: Vec<String> = match &spec.pid_ns_helper {
        Some(helper) if spec.mount_ns => [
            helper.to_string_lossy().into_owned(),
            "pid1".into(),
            "--".into(),
        ]
        .into_iter()
        .chain(spec.argv.iter().cloned())
        .collect(),
        _ => spec.argv.clone(),
    };
    let (prog, args) = argv.split_first().expect("argv is not empty");
    let ns_flags = libc::CLONE_NEWNS
        | if spec.pid_ns_helper.is_some() {
            libc::CLONE_NEWPID
        } else {
            0
        };
    let mut shadow = Shadow::default();
    let mounts = if spec.mount_ns {
        let ordered = mount_order(&spec.mounts);
        let mut prepared = Vec::with_capacity(ordered.len());
        for (i, m) in ordered.iter().enumerate() {
            ensure_target(m, &ordered[..i], &mut shadow)?;
            prepared.push(PreparedMount {
                src: cstr(&m.host_path)?,
                dst: cstr(&m.container_path)?,
                read_only: m.read_only,
            });
        }
        prepared
    } else {
        Vec::new()
    };
    let tmpfs: Vec<CString> = shadow
        .tmpfs
        .iter()
        .map(|d| cstr(d))
        .collect::<anyhow::Result<_>>()?;
    let create: Vec<(CString, bool)> = shadow
        .create
        .iter()
        .map(|(p, d)| Ok((cstr(p)?, *d)))
        .collect::<anyhow::Result<_>>()?;
    let procs = spec
        .cgroup
        .as_ref()
        .map(|d| cstr(&d.join("cgroup.procs")))
        .transpose()?;
    // Without a workingDir the runtime starts the process in the image's WORKDIR, "/" by default.
    let workdir = cstr(spec.working_dir.as_deref().unwrap_or(Path::new("/")))?;
    let mount_ns = spec.mount_ns;

    if let Some(dir) = spec.log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("opening the container log {}", spec.log.display()))?;
    let log_err = log.try_clone().context("duplicating the log descriptor")?;

    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(effective_env(&spec.env))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec and only makes system calls on data prepared
    // above (no allocation, no locks): write to cgroup.procs, unshare, mount, chdir.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                join_cgroup(procs)?;
            }
            if mount_ns {
                if libc::unshare(ns_flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Our mounts must not propagate back to the host.
                if libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                for d in &tmpfs {
                    if libc::mount(
                        c"tmpfs".as_ptr(),
                        d.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        c"mode=0755".as_ptr().cast(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (p, is_dir) in &create {
                    if *is_dir {
                        if libc::mkdir(p.as_ptr(), 0o755) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        if fd < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        libc::close(fd);
                    }
                }
                for m in &mounts {
                    bind(m)?;
                }
            }
            if libc::chdir(workdir.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| {
        format!(
            "starting {prog:?}{}{}{}",
            if spec.cgroup.is_some() {
                " (joining its cgroup"
            } else {
                " ("
            },
            if mount_ns {
                ", its mount namespace and bind mounts"
            } else {
                ""
            },
            ", working directory; the command must exist on this host)"
        )
    })
}

/// Moves the calling process into the cgroup: writing "0" to cgroup.procs moves the writer.
///
/// # Safety
/// Called in the forked child before exec: system calls only.
unsafe fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    // SAFETY: open/write/close on a NUL-terminated path prepared before fork.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// Bind-mounts one entry, read-only through a remount where asked.
///
/// # Safety
/// Called in the forked child before exec: system calls only.
unsafe fn bind(m: &PreparedMount) -> std::io::Result<()> {
    // SAFETY: mount(2) on NUL-terminated paths prepared before fork.
    unsafe {
        if libc::mount(
            m.src.as_ptr(),
            m.dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if m.read_only
            && libc::mount(
                std::ptr::null(),
                m.dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// 64 random hex digits, like a containerd container ID.
pub fn new_container_id() -> String {
    let mut b = [0u8; 32];
    if let Err(e) = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
    {
        panic!("reading /dev/urandom for a container ID: {e}");
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_env_wins_in_first_position() {
        let e = effective_env(&[
            ("A".into(), "1".into()),
            ("B".into(), "2".into()),
            ("A".into(), "3".into()),
        ]);
        assert_eq!(e, vec![("A".into(), "3".into()), ("B".into(), "2".into())]);
    }

    #[test]
    fn parents_mount_first() {
        let m = |c: &str| MountSpec {
            host_path: "/x".into(),
            container_path: c.into(),
            read_only: false,
        };
        let o = mount_order(&[
            m("/usr/local/vgpu/libvgpu.so"),
            m("/usr/local/vgpu"),
            m("/etc/ld.so.preload"),
        ]);
        let paths: Vec<_> = o
            .iter()
            .map(|m| m.container_path.to_str().unwrap())
            .collect();
        let at = |p: &str| paths.iter().position(|x| *x == p).unwrap();
        assert!(
            at("/usr/local/vgpu") < at("/usr/local/vgpu/libvgpu.so"),
            "{paths:?}"
        );
        assert_eq!(paths.len(), 3);
    }

    #[test]
    fn nested_targets_resolve_through_earlier_mounts() {
        let dir = MountSpec {
            host_path: "/var/vgpu/c1".into(),
            container_path: "/usr/local/vgpu".into(),
            read_only: false,
        };
        assert_eq!(
            host_view(
                Path::new("/usr/local/vgpu/libvgpu.so"),
                std::slice::from_ref(&dir)
            ),
            PathBuf::from("/var/vgpu/c1/libvgpu.so")
        );
        assert_eq!(
            host_view(Path::new("/etc/ld.so.preload"), &[dir]),
            PathBuf::from("/etc/ld.so.preload")
        );
    }

    #[test]
    fn container_ids_are_64_hex_and_differ() {
        let a = new_container_id();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_container_id());
    }
}
