//! `kubectl exec` for harness containers: each started container leaves a state file in the run
//! directory; a command run "in" it gets its environment, joins its mount namespace and its cgroup, and
//! starts in its working directory.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// What an exec needs to know about a running container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerRecord {
    pub pid: u32,
    pub container_id: String,
    pub cgroup: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub mount_ns: bool,
}

/// `<run-dir>/containers/<namespace>_<pod>_<container>.json`.
pub fn record_path(run_dir: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    run_dir
        .join("containers")
        .join(format!("{namespace}_{pod}_{container}.json"))
}

pub fn write_record(path: &Path, r: &ContainerRecord) -> anyhow::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The record of `container` of the pod (the pod's only running container when None).
pub fn find_record(
    run_dir: &Path,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
) -> anyhow::Result<ContainerRecord> {
    let path = match container {
        Some(c) => record_path(run_dir, namespace, pod, c),
        None => {
            let prefix = format!("{namespace}_{pod}_");
            let dir = run_dir.join("containers");
            let found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|es| {
                    es.flatten()
                        .map(|e| e.path())
                        .filter(|p| {
                            p.extension().is_some_and(|e| e == "json")
                                && p.file_name()
                                    .and_then(|n| n.to_str())
                                    .is_some_and(|n| n.starts_with(&prefix))
                        })
                        .collect()
                })
                .unwrap_or_default();
            match found.as_slice() {
                [one] => one.clone(),
                [] => bail!(
                    "no running container of pod {namespace}/{pod} under {}",
                    dir.display()
                ),
                _ => bail!("pod {namespace}/{pod} runs several containers: name one with -c"),
            }
        }
    };
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "no running container at {} (is the pod running on this harness?)",
            path.display()
        )
    })?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// A command that runs `argv` inside the container: its env, mount namespace, cgroup and working directory.
pub fn command_in(r: &ContainerRecord, argv: &[String]) -> anyhow::Result<Command> {
    let Some((prog, args)) = argv.split_first() else {
        bail!("no command given to run in the container");
    };
    let mnt: Option<OwnedFd> = if r.mount_ns {
        let p = format!("/proc/{}/ns/mnt", r.pid);
        Some(
            std::fs::File::open(&p)
                .with_context(|| format!("opening {p}: the container's process is gone"))?
                .into(),
        )
    } else {
        None
    };
    let procs = r
        .cgroup
        .as_ref()
        .map(|c| CString::new(c.join("cgroup.procs").as_os_str().as_bytes()))
        .transpose()?;
    let wd = CString::new(r.working_dir.as_os_str().as_bytes())?;
    let mut cmd = Command::new(prog);
    cmd.args(args).env_clear().envs(r.env.iter().cloned());
    // SAFETY: runs in the forked child before exec; system calls only on data prepared above.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(p) = &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            if let Some(fd) = &mnt {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::chdir(wd.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}
