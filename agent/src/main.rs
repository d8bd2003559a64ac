//! vgpu-agent: the node agent. `exec` runs a command in a slice on this host; `run` is the agent itself;
//! `status` shows what the agent (or the cache files alone) knows.

mod caches;
mod cgroups;
mod decode;
mod exec;
mod gpus;
mod ledger;
mod metrics;
mod pins;
mod probes;
mod procs;
mod report;
mod run;
mod state;
mod status;

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
    Status(status::StatusArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Exec(args) => exec::run(args),
        Cmd::Run(args) => run::run(args),
        Cmd::Status(args) => status::run(args),
    };
    std::process::exit(code);
}
