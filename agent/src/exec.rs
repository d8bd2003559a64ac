//! `vgpu-agent exec`: a slice on this host without Kubernetes.

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub fn run(_args: ExecArgs) -> i32 {
    1
}
