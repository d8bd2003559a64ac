//! vgpu-agent: the node agent. `exec` runs a command in a slice on this host; `run` is the agent itself;
//! `status` shows what the agent (or the cache files alone) knows.

use clap::{Parser, Subcommand};
use vgpu_agent::{ebpf, exec, observe, run};

#[derive(Parser)]
#[command(name = "vgpu-agent", version, about = "vgpu node agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command in a GPU slice on this host, without Kubernetes.
    Exec(exec::ExecArgs),
    /// Run the agent: eBPF host view of every container, cache mirror, policy, status socket, metrics.
    Run(Box<run::RunArgs>),
    /// Show per GPU and per container what the agent sees (or the cache files alone, with no agent).
    Status(observe::status::StatusArgs),
    /// Remove the agent's pinned probes and maps from bpffs (uninstall: the probes detach).
    Unpin(ebpf::pins::UnpinArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Exec(args) => exec::run(args),
        Cmd::Run(args) => run::run(*args),
        Cmd::Status(args) => observe::status::run(args),
        Cmd::Unpin(args) => ebpf::pins::unpin(args),
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The container args of deploy/agent/daemonset.yaml (the `- ` items under `args:`).
    fn daemonset_args() -> Vec<String> {
        let text = include_str!("../../deploy/agent/daemonset.yaml");
        let mut lines = text.lines().skip_while(|l| l.trim() != "args:").skip(1);
        let mut args = vec![];
        for l in lines.by_ref() {
            match l.trim().strip_prefix("- ") {
                Some(a) => args.push(a.to_string()),
                None => break,
            }
        }
        args
    }

    fn daemonset() -> serde_yaml::Value {
        serde_yaml::from_str(include_str!("../../deploy/agent/daemonset.yaml")).unwrap()
    }

    /// (mountPath, hostPath) of the agent container's hostPath volumes.
    fn host_mounts(ds: &serde_yaml::Value) -> Vec<(String, String)> {
        let spec = &ds["spec"]["template"]["spec"];
        let volumes = spec["volumes"].as_sequence().unwrap();
        spec["containers"][0]["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|m| {
                let v = volumes.iter().find(|v| v["name"] == m["name"])?;
                Some((
                    m["mountPath"].as_str()?.to_string(),
                    v["hostPath"]["path"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    #[test]
    fn the_daemonset_runs_the_agent_with_arguments_it_accepts() {
        let args = daemonset_args();
        assert!(args.len() > 3, "{args:?}");
        let cli = Cli::try_parse_from(std::iter::once("vgpu-agent".to_string()).chain(args))
            .unwrap_or_else(|e| panic!("deploy/agent/daemonset.yaml: {e}"));
        let Cmd::Run(run) = cli.cmd else {
            panic!("the DaemonSet must run `vgpu-agent run`")
        };
        assert!(
            run.pin_dir.starts_with("/sys/fs/bpf"),
            "pins on the host's bpffs (mounted by the DaemonSet)"
        );
        assert_eq!(run.cache_dir, std::path::Path::new(run::DEFAULT_CACHE_DIR));
        // deploy/ runs the node side; integration/tests/deploy_render.rs checks every other mount.
        assert!(!run.standalone, "the DaemonSet runs Kubernetes mode");
        // Kubernetes mode: what Allocate hands the kubelet are host paths, so the directories the agent
        // writes must be mounted at the same path inside its container as on the host.
        let ds = daemonset();
        let mounts = host_mounts(&ds);
        let same_path =
            |p: &std::path::Path| mounts.iter().any(|(m, h)| m == h && p.starts_with(m));
        for (what, p) in [
            ("--containers-dir", &run.node.containers_dir),
            ("--card-dir", &run.node.card_dir),
            ("--device-plugin-dir", &run.node.device_plugin_dir),
        ] {
            assert!(
                same_path(p),
                "{what} {} is not a hostPath mounted at the same path: {mounts:?}",
                p.display()
            );
        }
        let pr = run.node.pod_resources_socket.parent().unwrap();
        assert!(
            mounts.iter().any(|(m, _)| pr.starts_with(m)),
            "the PodResources socket's directory is mounted"
        );
        let key = run
            .node
            .seal_key_file
            .as_ref()
            .expect("--seal-key-file is required off --standalone");
        let container = &ds["spec"]["template"]["spec"]["containers"][0];
        assert!(
            container["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|m| key.starts_with(m["mountPath"].as_str().unwrap())),
            "the seal key's Secret is mounted"
        );
        let node_name = container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "NODE_NAME");
        assert!(
            run.node.node_name.is_some()
                || node_name
                    .is_some_and(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
            "NODE_NAME from spec.nodeName (or --node-name)"
        );
    }

    /// The Kubernetes mode's flags parse, and the defaults are the kubelet's and HAMi's paths.
    #[test]
    fn kubernetes_mode_flags_and_defaults() {
        let cli = Cli::try_parse_from([
            "vgpu-agent",
            "run",
            "--node-name=n1",
            "--seal-key-file=/etc/vgpu/seal/key",
            "--config=/etc/vgpu/config.yaml",
        ])
        .unwrap();
        let Cmd::Run(run) = cli.cmd else { panic!() };
        assert!(!run.standalone, "Kubernetes mode is the default");
        let n = run.node;
        assert_eq!(n.node_name.as_deref(), Some("n1"));
        let p = |s: &str| std::path::PathBuf::from(s);
        assert_eq!(n.device_plugin_dir, p("/var/lib/kubelet/device-plugins"));
        assert_eq!(
            n.pod_resources_socket,
            p("/var/lib/kubelet/pod-resources/kubelet.sock")
        );
        assert_eq!(n.containers_dir, p("/usr/local/vgpu/containers"));
        assert_eq!(n.shim_lib, p("/usr/local/vgpu/libvgpu.so"));
        assert_eq!(n.card_dir, p("/var/run/vgpu/cards"));
        assert_eq!(n.seal_key_file, Some(p("/etc/vgpu/seal/key")));
        assert_eq!(n.config, Some(p("/etc/vgpu/config.yaml")));
    }
}
