//! Builds the simulated GPU (simgpu/*.c) with the system's gcc into `$OUT_DIR/sim/` and tells the crate where:
//! `VGPU_SIM_DIR`. Plain gcc rather than the `cc` crate: the outputs are shared libraries and executables, not
//! a static library linked into Rust.
use std::path::Path;
use std::process::Command;

const CFLAGS: &[&str] = &["-O2", "-g", "-Wall", "-Werror", "-std=gnu17"];

fn gcc(out: &Path, args: &[&str]) {
    let mut cmd = Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()));
    cmd.args(CFLAGS).args(args).current_dir("simgpu");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run gcc (needed to build the simulated GPU): {e}"));
    assert!(
        status.success(),
        "gcc failed building {}: {cmd:?}",
        out.display()
    );
}

fn main() {
    println!("cargo:rerun-if-changed=simgpu");
    println!("cargo:rerun-if-env-changed=CC");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("sim");
    std::fs::create_dir_all(&out).unwrap();
    let o = |name: &str| out.join(name).to_str().unwrap().to_owned();

    // Hidden by default, exported by SIM_EXPORT; -Bsymbolic-functions keeps the libraries' own references (and
    // cuGetProcAddress's answers) on their own definitions even under a preloaded shim, as in the real driver.
    let lib = [
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",
        "-Wl,-Bsymbolic-functions",
    ];
    let cuda = o("libcuda.so.1");
    gcc(
        &out.join("libcuda.so.1"),
        &[
            &lib[..],
            &[
                "-Wl,-soname,libcuda.so.1",
                "-o",
                &cuda,
                "libcuda.c",
                "state.c",
                "-lpthread",
            ],
        ]
        .concat(),
    );
    let nvml = o("libnvidia-ml.so.1");
    gcc(
        &out.join("libnvidia-ml.so.1"),
        &[
            &lib[..],
            &[
                "-Wl,-soname,libnvidia-ml.so.1",
                "-o",
                &nvml,
                "libnvml.c",
                "state.c",
                "-lpthread",
            ],
        ]
        .concat(),
    );
    for (link, target) in [
        ("libcuda.so", "libcuda.so.1"),
        ("libnvidia-ml.so", "libnvidia-ml.so.1"),
    ] {
        let p = out.join(link);
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(target, &p).unwrap();
    }
    gcc(
        &out.join("nvidia-smi"),
        &["-o", &o("nvidia-smi"), "nvidia-smi.c", "-ldl"],
    );
    // cuda_oom links libcuda (the exported-symbol path); the others dlopen it, as the CUDA runtime does.
    gcc(
        &out.join("cuda_oom"),
        &[
            "-DLINKED",
            "-o",
            &o("cuda_oom"),
            "cuda_oom.c",
            &cuda,
            "-ldl",
        ],
    );
    for name in [
        "cuda_oom_dl",
        "cuda_allockinds",
        "cuda_launch",
        "cuda_procaddr",
        "cuda_fork",
        "cuda_reserves_dl",
    ] {
        let src = format!("{}.c", name.trim_end_matches("_dl"));
        gcc(&out.join(name), &["-o", &o(name), &src, "-ldl", "-lm"]);
    }
    println!("cargo:rustc-env=VGPU_SIM_DIR={}", out.display());
}
