//! vgpu-agent: the node agent. `exec` runs a command in a slice on this host; `run` is the agent itself;
//! `status` shows what the agent (or the cache files alone) knows.

mod exec;

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
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Exec(args) => exec::run(args),
    };
    std::process::exit(code);
}
