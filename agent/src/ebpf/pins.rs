//! Where the agent pins its maps on bpffs, so the next agent (a restart, an upgrade of the same build) takes
//! over the ring buffer its predecessor's probes kept writing to, instead of starting with a gap.
//!
//! Layout: `<pin dir>/<object id>/<MAP NAME>` and `<pin dir>/<object id>/links/<dev>_<ino>/<symbol>-<entry|
//! return>` (`launch-<symbol>`; bpffs refuses dots in names) for the probes of each libcuda file: pinned links stay attached when no agent
//! runs, even after a crash, and the next agent adopts them. The object id is a hash of the eBPF object: pins
//! of another build may have other layouts, so they are never reused; they are removed instead.
//! `vgpu-agent unpin` removes everything (uninstall).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/vgpu-agent";

#[derive(clap::Args, Debug)]
pub struct UnpinArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// `vgpu-agent unpin`: removes every pin, so the probes detach once no agent holds them (uninstall).
pub fn unpin(args: UnpinArgs) -> i32 {
    if !args.pin_dir.exists() {
        println!("nothing pinned at {}", args.pin_dir.display());
        return 0;
    }
    match std::fs::remove_dir_all(&args.pin_dir) {
        Ok(()) => {
            println!(
                "unpinned {}: its probes detach once no running agent holds them",
                args.pin_dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("vgpu-agent unpin: {}: {e}", args.pin_dir.display());
            1
        }
    }
}

/// FNV-1a of the object bytes: stable across builds of the agent, unlike std's hasher.
pub fn object_id(object: &[u8]) -> String {
    let h = object.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

fn on_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; c is a valid NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::BPF_FS_MAGIC
    }
}

/// The directory for this build's pins (created), with pins of other builds removed. `dir` or its parent
/// must be on a bpf filesystem.
pub fn prepare(dir: &Path, object: &[u8]) -> Result<PathBuf> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !on_bpffs(dir) && !on_bpffs(parent) {
        bail!(
            "{} is not on a bpf filesystem (mount one with `mount -t bpf bpf {}`)",
            dir.display(),
            parent.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let id = object_id(object);
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_name() != id.as_str() {
            tracing::info!(
                "unpinning maps of another agent build: {}",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let mine = dir.join(id);
    std::fs::create_dir_all(&mine).with_context(|| mine.display().to_string())?;
    Ok(mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_tell_builds_apart() {
        assert_eq!(object_id(b"abc"), object_id(b"abc"));
        assert_ne!(object_id(b"abc"), object_id(b"abd"));
        assert_eq!(object_id(b"").len(), 16);
    }

    #[test]
    fn a_directory_off_bpffs_is_refused_with_the_fix() {
        let d = std::env::temp_dir().join(format!("vgpu-pins-{}", std::process::id()));
        let e = prepare(&d.join("pins"), b"x").unwrap_err().to_string();
        assert!(e.contains("mount -t bpf"), "{e}");
    }
}
