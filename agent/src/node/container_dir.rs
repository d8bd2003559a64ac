//! The per-container host directory (`contract::container_dir`): created at Allocate with an empty limits file,
//! the preload line and the cache file; the limits file filled in place once the kubelet confirms the container.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use vgpu_contract::cache_layout::{CacheRegion, HeaderInfo, MAX_DEVICES};
use vgpu_contract::container_dir as cd;

/// The settings of one container, written as `NAME=value` lines (the environment's keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings(pub Vec<(String, String)>);

#[derive(Debug, Clone)]
pub struct ContainerDir {
    pub dir: PathBuf,
}

/// Whom a directory serves: the pod and container Allocate guessed, then the one the kubelet named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub container: String,
}

impl ContainerDir {
    /// A new directory for one Allocate answer over `ids` (see [`cd::allocation_dir_name`]): never one
    /// used before, so no earlier container's files or charges carry over.
    pub fn for_allocation(root: &Path, ids: &[String]) -> io::Result<Self> {
        static LAST: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
        let serial = {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let mut last = LAST.lock().unwrap();
            *last = now.max(*last + 1);
            *last
        };
        let first = ids.first().map_or("", String::as_str);
        let name = cd::allocation_dir_name(first, serial).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("device ID {first:?} is not a plain name"),
            )
        })?;
        Ok(Self {
            dir: root.join(name),
        })
    }

    /// Records whom the directory serves (replaced in one rename: a reader sees the old owner or the new).
    pub fn write_owner(&self, o: &Owner) -> io::Result<()> {
        let tmp = self.dir.join(format!(".{}.tmp", cd::OWNER_NAME));
        std::fs::write(
            &tmp,
            format!(
                "uid={}\nnamespace={}\nname={}\ncontainer={}\n",
                o.uid, o.namespace, o.name, o.container
            ),
        )?;
        std::fs::rename(tmp, self.dir.join(cd::OWNER_NAME))
    }

    /// Whom the directory serves, if it says (a directory from before owners were recorded does not).
    pub fn read_owner(&self) -> Option<Owner> {
        let t = std::fs::read_to_string(self.dir.join(cd::OWNER_NAME)).ok()?;
        // The same `NAME=value` lines as the limits file, read by the same parser.
        let kv = vgpu_contract::limits::parse_limits_file(&t).ok()?;
        let get = |k: &str| {
            kv.iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        Some(Owner {
            uid: get("uid")?,
            namespace: get("namespace")?,
            name: get("name")?,
            container: get("container")?,
        })
    }

    pub fn limits(&self) -> PathBuf {
        self.dir.join(cd::LIMITS_NAME)
    }
    pub fn preload(&self) -> PathBuf {
        self.dir.join(cd::PRELOAD_NAME)
    }
    pub fn cache(&self) -> PathBuf {
        self.dir.join(cd::CACHE_NAME)
    }

    /// Creates the directory for a container about to be created, with an empty (pending) limits file. The
    /// directory must not exist: each Allocate answer has its own.
    pub fn create(&self, cache: &HeaderInfo) -> io::Result<()> {
        if let Some(root) = self.dir.parent() {
            std::fs::create_dir_all(root)?;
        }
        std::fs::create_dir(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))?;
        let limits = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(self.limits())?;
        limits.sync_all()?;
        std::fs::write(self.preload(), format!("{}\n", cd::CONTAINER_SHIM))?;
        std::fs::set_permissions(self.preload(), std::fs::Permissions::from_mode(0o644))?;
        // The shim maps the cache file and needs its header; an existing one keeps what it has charged.
        CacheRegion::open_or_create(&self.cache(), cache)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(())
    }

    /// Fills the limits file with `settings` and `VGPU_LIMITS_STATE=ready` (the contract's
    /// [`cd::render_limits`]), in place (same inode: the container's read-only bind mount points at it).
    pub fn ready(&self, settings: &Settings) -> io::Result<()> {
        let values: Vec<(&str, String)> = settings
            .0
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        self.write_limits(&cd::render_limits(&values, &cd::LimitsState::Ready))
    }

    /// Marks the container revoked: the shim then refuses every allocation and launch, and logs `reason`.
    pub fn revoke(&self, reason: &str) -> io::Result<()> {
        self.write_limits(&cd::render_limits(
            &[],
            &cd::LimitsState::Revoked(reason.to_string()),
        ))
    }

    fn write_limits(&self, text: &str) -> io::Result<()> {
        // Never create it here: a missing file means the directory was not made by Allocate.
        let f: File = OpenOptions::new().write(true).open(self.limits())?;
        // Write the new bytes over the old and only then cut the tail, so a reader never meets an empty
        // file where a state stood; an instant's mix of new text and old tail reads as damaged (two state
        // lines) or pending, and the shim refuses on both, never as a laxer state.
        f.write_all_at(text.as_bytes(), 0)?;
        f.set_len(text.len() as u64)?;
        f.sync_all()
    }
}

/// The cache header for a container's devices: `limits` in bytes per CUDA ordinal.
pub fn cache_header(limits: &[u64], sm_limit: u32, policy: u32) -> HeaderInfo {
    let mut memory_limits = [0u64; MAX_DEVICES];
    for (slot, l) in memory_limits.iter_mut().zip(limits) {
        *slot = *l;
    }
    HeaderInfo {
        memory_limits,
        sm_limit,
        policy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_limits_file_keeps_its_inode_from_pending_to_ready_to_revoked() {
        let root = std::env::temp_dir().join(format!("vgpu-cd-{}", std::process::id()));
        let ids = ["GPU-a-1".to_string()];
        let d = ContainerDir::for_allocation(&root, &ids).unwrap();
        d.create(&cache_header(&[4000 << 20], 30, 1)).unwrap();
        assert_eq!(std::fs::read_to_string(d.limits()).unwrap(), "");
        assert_eq!(
            std::fs::read_to_string(d.preload()).unwrap(),
            "/usr/local/vgpu/libvgpu.so\n"
        );
        CacheRegion::open_existing(&d.cache()).expect("the shim can map the cache file");
        let ino = std::fs::metadata(d.limits()).unwrap().ino();
        d.ready(&Settings(vec![(
            "CUDA_DEVICE_SM_LIMIT".into(),
            "30".into(),
        )]))
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(d.limits()).unwrap(),
            "# written by vgpu-agent; read by libvgpu.so\nCUDA_DEVICE_SM_LIMIT=30\nVGPU_LIMITS_STATE=ready\n"
        );
        d.revoke("on another pod's\ndevices").unwrap();
        assert_eq!(
            std::fs::read_to_string(d.limits()).unwrap(),
            "# written by vgpu-agent; read by libvgpu.so\nVGPU_LIMITS_REASON=on another pod's devices\nVGPU_LIMITS_STATE=revoked\n"
        );
        assert_eq!(std::fs::metadata(d.limits()).unwrap().ino(), ino);
        // Each answer has its own directory: a second one over the same IDs is another, and an existing
        // directory is never taken over.
        let d2 = ContainerDir::for_allocation(&root, &ids).unwrap();
        assert_ne!(d2.dir, d.dir);
        assert!(d.create(&cache_header(&[4000 << 20], 30, 1)).is_err());
        assert!(ContainerDir::for_allocation(&root, &["../x".to_string()]).is_err());
        // The owner record reads back, and is replaced whole.
        assert_eq!(d.read_owner(), None);
        let mut o = Owner {
            uid: "u1".into(),
            namespace: "ns".into(),
            name: "a".into(),
            container: "c0".into(),
        };
        d.write_owner(&o).unwrap();
        assert_eq!(d.read_owner(), Some(o.clone()));
        o.name = "b".into();
        d.write_owner(&o).unwrap();
        assert_eq!(d.read_owner(), Some(o));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
