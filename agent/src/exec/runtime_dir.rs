//! Where `exec` keeps a slice's files when the caller names none: a directory of the calling user's own,
//! never a shared `/tmp` name another user could have planted (a symlink, or a directory they own).

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The directories tried, in order, for `uid` (with `$XDG_RUNTIME_DIR` as given).
pub fn candidates(uid: u32, xdg_runtime_dir: Option<&str>) -> Vec<PathBuf> {
    if uid == 0 {
        return vec![PathBuf::from("/run/vgpu/exec")];
    }
    let mut v = vec![];
    if let Some(x) = xdg_runtime_dir.filter(|x| x.starts_with('/')) {
        v.push(Path::new(x).join("vgpu"));
    }
    v.push(PathBuf::from(format!("/run/user/{uid}/vgpu")));
    v.push(std::env::temp_dir().join(format!("vgpu-exec-{uid}")));
    v
}

/// Makes (or checks) `dir` as a private directory of `uid`: created 0700 with its parent existing, or already
/// there as a real directory (not a symlink) owned by `uid` with no access for anyone else.
pub fn ensure_private(dir: &Path, uid: u32) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let md = std::fs::symlink_metadata(dir)?;
    if !md.file_type().is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory (a symlink or file in its place)",
            dir.display()
        )));
    }
    if md.uid() != uid {
        return Err(io::Error::other(format!(
            "{} belongs to uid {}, not to you (uid {uid})",
            dir.display(),
            md.uid()
        )));
    }
    if md.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} is open to other users (mode {:o}); expected 0700",
            dir.display(),
            md.permissions().mode() & 0o777
        )));
    }
    Ok(())
}

/// The first candidate that is (or can be made) a private directory of the caller.
pub fn for_caller() -> Result<PathBuf, String> {
    // SAFETY: getuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    let xdg = std::env::var("XDG_RUNTIME_DIR").ok();
    let mut why = vec![];
    for c in candidates(uid, xdg.as_deref()) {
        if uid == 0 {
            if let Some(p) = c.parent() {
                let _ = std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(p);
            }
        }
        match ensure_private(&c, uid) {
            Ok(()) => return Ok(c),
            Err(e) => why.push(format!("{}: {e}", c.display())),
        }
    }
    Err(format!(
        "no private runtime directory for the slice's files ({}); pass --cache FILE",
        why.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> u32 {
        // SAFETY: getuid(2) cannot fail.
        unsafe { libc::getuid() }
    }

    #[test]
    fn root_and_users_get_different_places() {
        assert_eq!(
            candidates(0, Some("/run/user/0")),
            [PathBuf::from("/run/vgpu/exec")]
        );
        let c = candidates(1000, Some("/run/user/1000"));
        assert_eq!(c[0], PathBuf::from("/run/user/1000/vgpu"));
        assert!(c.iter().all(|p| p.to_string_lossy().contains("1000")));
        assert!(
            !candidates(1000, Some("relative"))
                .iter()
                .any(|p| p.starts_with("relative")),
            "a relative XDG_RUNTIME_DIR is ignored"
        );
    }

    #[test]
    fn a_planted_symlink_or_a_shared_directory_is_refused() {
        let t = std::env::temp_dir().join(format!("vgpu-rt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(&t).unwrap();
        let target = t.join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = t.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(ensure_private(&link, me()).is_err(), "symlink followed");
        let open = t.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            ensure_private(&open, me()).is_err(),
            "world-writable dir accepted"
        );
        assert!(ensure_private(&t.join("fresh"), me()).is_ok());
        assert_eq!(
            std::fs::metadata(t.join("fresh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert!(
            ensure_private(&t.join("fresh"), me() + 1).is_err(),
            "another user's dir accepted"
        );
        std::fs::remove_dir_all(&t).unwrap();
    }
}
