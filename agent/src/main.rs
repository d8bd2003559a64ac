//! vgpu-agent: the node agent. `exec` runs a command in a slice on this host; `run` is the agent itself;
//! `status` shows what the agent (or the cache files alone) knows.

mod ebpf;
mod exec;
mod gpus;
mod ledger;
mod observe;
mod run;

use clap::{Parser, Subcommand};

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
    Run(run::RunArgs),
    /// Show per GPU and per container what the agent sees (or the cache files alone, with no agent).
    Status(observe::status::StatusArgs),
    /// Remove the agent's pinned probes and maps from bpffs (uninstall: the probes detach).
    Unpin(ebpf::pins::UnpinArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Exec(args) => exec::run(args),
        Cmd::Run(args) => run::run(args),
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

    #[test]
    fn the_daemonset_runs_the_agent_with_arguments_it_accepts() {
        let args = daemonset_args();
        assert!(args.len() > 3, "{args:?}");
        let cli = Cli::try_parse_from(std::iter::once("vgpu-agent".to_string()).chain(args))
            .unwrap_or_else(|e| panic!("deploy/agent/daemonset.yaml: {e}"));
        let Cmd::Run(run) = cli.cmd else {
            panic!("the DaemonSet must run `vgpu-agent run`")
        };
        // The DaemonSet runs the Kubernetes node side; integration/tests/deploy_render.rs checks its mounts.
        assert!(!run.standalone, "the DaemonSet runs Kubernetes mode");
        assert!(
            run.pin_dir.starts_with("/sys/fs/bpf"),
            "pins on the host's bpffs (mounted by the DaemonSet)"
        );
        assert_eq!(run.cache_dir, std::path::Path::new(run::DEFAULT_CACHE_DIR));
    }
}
