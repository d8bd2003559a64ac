use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use vgpu_scheduler::placement::policy::Policy;
use vgpu_scheduler::placement::request::DefaultMemory;
use vgpu_scheduler::placement::Config;

#[derive(Parser)]
#[command(
    name = "vgpu-scheduler",
    version,
    about = "Places vGPU pods on nodes and GPUs (HAMi-compatible extender and webhook)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Place the pending pods of a Kubernetes List (YAML or JSON) in order and print where each goes.
    Simulate {
        /// The file, e.g. from `kubectl get nodes,pods -A -o yaml`; `-` reads standard input.
        file: PathBuf,
        /// Print a JSON array of {pod, node, devices, reason, score}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        placement: PlacementArgs,
    },
}

#[derive(Args, Clone)]
struct PlacementArgs {
    /// Node policy when a pod sets no hami.io/node-scheduler-policy.
    #[arg(long, default_value = "binpack", value_parser = parse_policy)]
    node_policy: Policy,
    /// GPU policy when a pod sets no hami.io/gpu-scheduler-policy.
    #[arg(long, default_value = "spread", value_parser = parse_policy)]
    gpu_policy: Policy,
    /// Memory per vGPU when a container sets neither gpumem nor gpumem-percentage: MiB (`2048`)
    /// or a percentage of the card (`100%`, HAMi's default).
    #[arg(long, default_value = "100%", value_parser = parse_default_memory)]
    default_mem: DefaultMemory,
}

impl PlacementArgs {
    fn config(&self) -> Config {
        Config {
            default_memory: self.default_mem,
            node_policy: self.node_policy,
            gpu_policy: self.gpu_policy,
        }
    }
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse()
        .map_err(|e: vgpu_scheduler::placement::policy::UnknownPolicy| e.to_string())
}

fn parse_default_memory(s: &str) -> Result<DefaultMemory, String> {
    let bad = || format!("{s:?} is neither MiB (2048) nor a percentage of the card (1% to 100%)");
    match s.strip_suffix('%') {
        Some(p) => match p.trim().parse::<u32>() {
            Ok(p) if (1..=100).contains(&p) => Ok(DefaultMemory::Percent(p)),
            _ => Err(bad()),
        },
        None => match s.trim().parse::<u64>() {
            Ok(m) if m > 0 => Ok(DefaultMemory::MiB(m)),
            _ => Err(bad()),
        },
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate {
            file,
            json,
            placement,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
            };
            let out = vgpu_scheduler::simulate::run(&text, &placement.config(), json)
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", file.display()))?;
            print!("{out}");
        }
    }
    Ok(())
}
