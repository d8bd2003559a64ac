//! The agent's build script reruns when the eBPF toolchain appears, so "install the toolchain and rebuild"
//! gives an agent with its programs without `cargo clean` (it did not: nothing the script watched changed).
//! A scratch crate uses agent/build.rs as its build script against a PATH and HOME without `bpf-linker`;
//! then `bpf-linker` appears where scripts/install-ebpf-toolchain.sh puts it (`$HOME/.cargo/bin`).

use std::path::Path;
use std::process::Command;

fn cargo_build(dir: &Path, home: &Path) -> String {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(dir)
        .args(["build", "-vv", "--offline"])
        .env("HOME", home)
        .env_remove("CARGO_HOME")
        .env(
            "CARGO_HOME",
            std::env::var("CARGO_HOME").unwrap_or_else(|_| {
                format!("{}/.cargo", std::env::var("HOME").unwrap_or_default())
            }),
        )
        // bpf-linker is looked up on PATH; cargo's bin directory is on it as rustup sets it up.
        .env(
            "PATH",
            format!(
                "{}:{}:/usr/bin:/bin",
                home.join(".cargo/bin").display(),
                Path::new(&std::env::var("CARGO").unwrap_or_default())
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        )
        .env_remove("VGPU_REQUIRE_EBPF")
        .env_remove("VGPU_EBPF_OBJECT")
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn the_build_script_reruns_when_bpf_linker_appears() {
    let t = std::env::temp_dir().join(format!("vgpu-build-script-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    let krate = t.join("probe");
    let home = t.join("home");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build.rs");
    std::fs::write(
        krate.join("Cargo.toml"),
        format!(
            "[package]\nname = \"probe\"\nversion = \"0.0.0\"\nedition = \"2021\"\nbuild = \"{}\"\n[workspace]\n",
            script.display()
        ),
    )
    .unwrap();
    std::fs::write(krate.join("src/main.rs"), "fn main() {}\n").unwrap();
    // The eBPF sources the script watches, beside the crate as in the repository (unchanged throughout).
    let ebpf = t.join("agent-ebpf");
    std::fs::create_dir_all(ebpf.join("src")).unwrap();
    std::fs::create_dir_all(ebpf.join("common/src")).unwrap();
    for f in ["Cargo.toml", "Cargo.lock", "common/Cargo.toml"] {
        std::fs::write(ebpf.join(f), "").unwrap();
    }

    let first = cargo_build(&krate, &home);
    assert!(first.contains("agent-ebpf not built"), "{first}");
    let again = cargo_build(&krate, &home);
    // Missing toolchain files are watched: the script keeps checking until they exist.
    assert!(again.contains("agent-ebpf not built"), "{again}");

    // The toolchain appears (a stand-in bpf-linker that is found but cannot build anything).
    let bin = home.join(".cargo/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let linker = bin.join("bpf-linker");
    std::fs::write(&linker, "#!/bin/sh\nexit 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&linker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let after = cargo_build(&krate, &home);
    assert!(
        after.contains("Running") && after.contains("build-script-build"),
        "the build script did not run again after bpf-linker appeared:\n{after}"
    );
    std::fs::remove_dir_all(&t).unwrap();
}
