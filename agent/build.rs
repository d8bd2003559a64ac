//! Builds agent-ebpf (the uprobe programs, target bpfel-unknown-none) and hands the object to the agent
//! through VGPU_EBPF_OBJECT_PATH, so `cargo build` of the workspace builds everything.
//!
//! Toolchains, tried in order (see scripts/install-ebpf-toolchain.sh and docs/agent.md):
//! 1. `VGPU_EBPF_OBJECT=/path/to/object`: a prebuilt object, used as is.
//! 2. Debian's rustc-web (`/usr/bin/rustc`, LLVM 22) with its prebuilt `core` for bpfel and `bpf-linker`
//!    built on LLVM 22: works without rust-src or a nightly toolchain.
//! 3. A rustup nightly with rust-src (`-Z build-std=core`), the usual aya way.
//!
//! Without any of them the agent is built without programs (a cargo warning says so, and `vgpu-agent run`
//! refuses to start), so the rest of the workspace still builds; `VGPU_REQUIRE_EBPF=1` (CI) makes it an error.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let ebpf_dir = manifest.parent().unwrap().join("agent-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let object = out_dir.join("vgpu-agent-ebpf.o");

    for p in [
        "src",
        "common/src",
        "common/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    for v in [
        "VGPU_EBPF_OBJECT",
        "VGPU_REQUIRE_EBPF",
        "VGPU_EBPF_TOOLCHAIN",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rustc-env=VGPU_EBPF_OBJECT_PATH={}", object.display());

    let result = match env::var_os("VGPU_EBPF_OBJECT") {
        Some(prebuilt) => fs::copy(&prebuilt, &object)
            .map(|_| "prebuilt".to_string())
            .map_err(|e| format!("VGPU_EBPF_OBJECT={}: {e}", Path::new(&prebuilt).display())),
        None => build(&ebpf_dir, &out_dir.join("ebpf-target"), &object),
    };
    // Rebuild when the toolchain changes or appears: the files it was found in, or, when it is missing, where
    // scripts/install-ebpf-toolchain.sh puts it (a path that does not exist yet makes cargo rerun this script
    // on every build until it does, so "install the toolchain and rebuild" works without `cargo clean`).
    for p in toolchain_watch_paths() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    match result {
        Ok(how) => println!("cargo:rustc-env=VGPU_EBPF_BUILT_WITH={how}"),
        Err(why) => {
            if env::var("VGPU_REQUIRE_EBPF").is_ok_and(|v| v == "1") {
                panic!("agent-ebpf: {why}");
            }
            println!("cargo:warning=agent-ebpf not built ({why}); vgpu-agent run will refuse to start. Run scripts/install-ebpf-toolchain.sh and rebuild.");
            println!("cargo:rustc-env=VGPU_EBPF_BUILT_WITH=none");
            fs::write(&object, b"").unwrap();
        }
    }
}

/// Every place the toolchain is looked for: `bpf-linker` in each PATH directory and cargo's bin directory,
/// Debian's rustc and its prebuilt bpfel `core`.
fn toolchain_watch_paths() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).map(|d| d.join("bpf-linker")).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME")
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into_os_string()))
    {
        v.push(Path::new(&home).join("bin/bpf-linker"));
    }
    v.push(PathBuf::from("/usr/bin/rustc"));
    v.push(PathBuf::from("/usr/lib/rustlib").join(BPF_TARGET));
    v.retain(|p| p.is_absolute());
    v.dedup();
    v
}

fn which(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn debian_toolchain() -> Option<PathBuf> {
    let rustc = PathBuf::from("/usr/bin/rustc");
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout).ok()?.trim());
    sysroot
        .join("lib/rustlib")
        .join(BPF_TARGET)
        .is_dir()
        .then_some(rustc)
}

fn nightly_with_rust_src() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .is_some_and(|s| {
            Path::new(s.trim())
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
        })
}

fn build(ebpf_dir: &Path, target_dir: &Path, object: &Path) -> Result<String, String> {
    let linker = which("bpf-linker").ok_or("bpf-linker not on PATH")?;
    let wanted = env::var("VGPU_EBPF_TOOLCHAIN").unwrap_or_default();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd;
    let how;
    if let (true, Some(rustc)) = (wanted.is_empty() || wanted == "debian", debian_toolchain()) {
        cmd = Command::new(&cargo);
        cmd.env("RUSTC", rustc);
        how = "debian-rustc-web";
    } else if (wanted.is_empty() || wanted == "nightly") && nightly_with_rust_src() {
        cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC");
        cmd.arg("-Z").arg("build-std=core");
        how = "nightly-build-std";
    } else {
        return Err("no bpfel toolchain: neither Debian's rustc-web with libstd-rust-web-dev-bpf nor a nightly with rust-src".into());
    }
    // The outer cargo's settings are for the host: none of them may leak into the bpfel build.
    for v in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTDOC",
        "RUSTC_LINKER",
    ] {
        cmd.env_remove(v);
    }
    cmd.current_dir(ebpf_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"),
        )
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            BPF_TARGET,
            "--bin",
            "vgpu-agent-ebpf",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    let out = cmd
        .output()
        .map_err(|e| format!("running cargo for agent-ebpf: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build of agent-ebpf failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let built = target_dir.join(BPF_TARGET).join("release/vgpu-agent-ebpf");
    fs::copy(&built, object).map_err(|e| format!("copying {}: {e}", built.display()))?;
    Ok(how.to_string())
}
