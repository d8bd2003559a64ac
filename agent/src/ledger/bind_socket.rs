//! The bind socket (`/run/vgpu/bind.sock`, mode 0666: any user may run `vgpu-agent exec`): `exec` registers
//! the slice it starts and unregisters it when its command exits. Who asks is taken from the kernel
//! (`SO_PEERCRED`), never from the request: root may bind any cgroup; another user only a cgroup directory it
//! owns and a cache file it owns. One JSON request per line, one JSON reply per line
//! ([`vgpu_contract::agent_socket`]).

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use vgpu_contract::agent_socket::{ExecBinding, Reply, Request};

use crate::ledger::bindings::{check_cgroup_path, Binding};

pub use vgpu_contract::agent_socket::BIND_SOCKET as DEFAULT_BIND_SOCKET;

/// A request line longer than this is refused (a binding is a few hundred bytes).
const MAX_LINE: usize = 64 << 10;
/// A client that sends nothing for this long is dropped.
const IDLE: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 32;

/// What the bind socket asks of the agent's state, with the peer's uid (already authorized for the paths).
pub enum Op {
    Bind(Binding),
    Unbind { cgroup: String, uid: u32 },
}

pub type Apply = Arc<dyn Fn(Op) -> Result<(), String> + Send + Sync>;

/// Binds `path` (mode 0666) and serves it until the task is dropped.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, cgroup_root: PathBuf, apply: Apply) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let root = cgroup_root.clone();
        let apply = apply.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(conn, &root, &apply).await {
                tracing::debug!("bind socket: {e}");
            }
        });
    }
}

async fn connection(conn: UnixStream, cgroup_root: &Path, apply: &Apply) -> std::io::Result<()> {
    let cred = conn.peer_cred()?;
    let (uid, pid) = (cred.uid(), cred.pid().unwrap_or(0));
    let (r, mut w) = conn.into_split();
    // Bounded per connection: a client cannot make the agent buffer without end.
    let mut r = BufReader::new(r.take(MAX_LINE as u64 * 16));
    let mut line = String::new();
    loop {
        line.clear();
        let n = match tokio::time::timeout(IDLE, r.read_line(&mut line)).await {
            Ok(n) => n?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let reply = if line.len() > MAX_LINE {
            Reply::Error(format!("request over {MAX_LINE} bytes"))
        } else {
            match answer(&line, uid, cgroup_root, apply) {
                Ok(()) => Reply::Ok,
                Err(e) => {
                    tracing::warn!("bind socket: refused uid {uid} (pid {pid}): {e}");
                    Reply::Error(e)
                }
            }
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        w.write_all(&out).await?;
    }
}

fn answer(line: &str, uid: u32, cgroup_root: &Path, apply: &Apply) -> Result<(), String> {
    let req: Request = serde_json::from_str(line.trim())
        .map_err(|e| format!("not a request of this agent's version: {e}"))?;
    match req {
        Request::Status => Err("status is served on the root-only status socket".into()),
        Request::Bind(b) => {
            authorize(uid, &b, cgroup_root)?;
            let binding = Binding::from_exec(&b, uid);
            tracing::info!(
                "bound {} to {} for uid {uid} (exec pid {})",
                binding.cgroup,
                binding.cache_path.display(),
                b.pid
            );
            apply(Op::Bind(binding))
        }
        Request::Unbind { cgroup } => apply(Op::Unbind { cgroup, uid }),
    }
}

/// Root may bind anything; another uid must own the cgroup directory and the cache file, each opened without
/// following a symlink and checked on the opened file (so it cannot be swapped between check and use).
pub fn authorize(uid: u32, b: &ExecBinding, cgroup_root: &Path) -> Result<(), String> {
    check_cgroup_path(&b.cgroup)?;
    if uid == 0 {
        return Ok(());
    }
    let dir = cgroup_root.join(b.cgroup.trim_start_matches('/'));
    let owner = owner_of(&dir, libc::O_PATH | libc::O_DIRECTORY)
        .map_err(|e| format!("cgroup {}: {e}", b.cgroup))?;
    if owner != uid {
        return Err(format!(
            "cgroup {} belongs to uid {owner}, not to uid {uid}: a user may bind only a cgroup directory it owns",
            b.cgroup
        ));
    }
    let owner = owner_of(Path::new(&b.cache), libc::O_RDONLY | libc::O_NONBLOCK)
        .map_err(|e| format!("cache file {}: {e}", b.cache))?;
    if owner != uid {
        return Err(format!(
            "cache file {} belongs to uid {owner}, not to uid {uid}: a user may bind only a cache file it owns",
            b.cache
        ));
    }
    Ok(())
}

/// The owner of `path`, opened with `flags | O_NOFOLLOW | O_CLOEXEC`; a cache file must be a regular file.
fn owner_of(path: &Path, flags: i32) -> Result<u32, String> {
    let f = std::fs::OpenOptions::new()
        .read(true) // O_RDONLY is 0: with O_PATH it asks for nothing more
        .custom_flags(flags | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    let m = f.metadata().map_err(|e| e.to_string())?;
    if flags & libc::O_DIRECTORY == 0 && !m.file_type().is_file() {
        return Err("not a regular file".into());
    }
    Ok(m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::chown;

    fn req(cgroup: &str, cache: &Path) -> ExecBinding {
        ExecBinding {
            cgroup: cgroup.into(),
            cache: cache.display().to_string(),
            memory_limits: [(0, 1 << 30)].into(),
            sm_limit: 0,
            policy: "default".into(),
            pid: 1,
        }
    }

    /// A stand-in cgroup2 root: `mine` owned by uid 4242, `theirs` by root; cache files likewise.
    fn tree(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vgpu-bind-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for c in ["cg/mine", "cg/theirs"] {
            std::fs::create_dir_all(d.join(c)).unwrap();
        }
        std::fs::write(d.join("mine.cache"), b"x").unwrap();
        std::fs::write(d.join("theirs.cache"), b"x").unwrap();
        std::os::unix::fs::symlink(d.join("mine.cache"), d.join("link.cache")).unwrap();
        d
    }

    #[test]
    fn a_user_binds_only_what_it_owns() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP a_user_binds_only_what_it_owns: chown needs root");
            return;
        }
        let d = tree("own");
        chown(d.join("cg/mine"), Some(4242), None).unwrap();
        chown(d.join("mine.cache"), Some(4242), None).unwrap();
        let root = d.join("cg");
        assert_eq!(
            authorize(4242, &req("/mine", &d.join("mine.cache")), &root),
            Ok(())
        );
        let e = authorize(4242, &req("/theirs", &d.join("mine.cache")), &root).unwrap_err();
        assert!(e.contains("belongs to uid 0, not to uid 4242"), "{e}");
        let e = authorize(4242, &req("/mine", &d.join("theirs.cache")), &root).unwrap_err();
        assert!(e.contains("cache file"), "{e}");
        let e = authorize(4242, &req("/mine", &d.join("link.cache")), &root).unwrap_err();
        assert!(
            e.contains("symbolic links"),
            "a symlink is not followed: {e}"
        );
        let e = authorize(4242, &req("/mine/../theirs", &d.join("mine.cache")), &root).unwrap_err();
        assert!(e.contains("without `.`, `..`"), "{e}");
        assert_eq!(
            authorize(0, &req("/theirs", &d.join("theirs.cache")), &root),
            Ok(()),
            "root binds anything"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
