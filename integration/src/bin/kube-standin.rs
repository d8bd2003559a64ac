//! kube-standin: an in-memory Kubernetes API server for tests (see `vgpu_integration::standin`).
//!
//! `kube-standin --listen 127.0.0.1:0` prints the port it chose as its first line of stdout;
//! `--kubeconfig-out FILE` also writes a kubeconfig that kubectl and kube-rs can use.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use vgpu_integration::standin::{
    Config, ServingCert, Standin, Users, WebhookSpec, DEFAULT_HISTORY,
};

#[derive(Parser, Debug)]
#[command(
    name = "kube-standin",
    about = "In-memory Kubernetes API server for tests"
)]
struct Args {
    /// Address to serve plain HTTP on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig for this server here (written before the port is printed).
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Bearer token the written kubeconfig authenticates with (a token of --token-auth-file).
    #[arg(long, requires = "kubeconfig_out")]
    kubeconfig_token: Option<String>,
    /// Mutating admission webhook for pods, `[NAME=]URL`; repeat for several (called in order).
    #[arg(long = "mutating-webhook")]
    mutating_webhooks: Vec<WebhookSpec>,
    /// Validating admission webhook for pods, `[NAME=]URL`; repeat for several.
    #[arg(long = "validating-webhook")]
    validating_webhooks: Vec<WebhookSpec>,
    /// Pods in this namespace skip the webhooks (a namespaceSelector excluding it); repeatable.
    #[arg(long = "webhook-exempt-namespace")]
    webhook_exempt_namespaces: Vec<String>,
    /// PEM CA bundle for https webhooks.
    #[arg(long)]
    webhook_ca: Option<PathBuf>,
    /// kube-apiserver's static token file: `token,user,uid[,"group1,group2"]` per line.
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (kubectl sends tokens only over HTTPS).
    #[arg(long, requires = "tls_private_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The PEM private key of --tls-cert-file.
    #[arg(long, requires = "tls_cert_file")]
    tls_private_key_file: Option<PathBuf>,
    /// The CA that --tls-cert-file chains to, named in the written kubeconfig (default: the certificate).
    #[arg(long, requires = "tls_cert_file")]
    kubeconfig_ca: Option<PathBuf>,
    /// Changes kept for watches to resume from.
    #[arg(long, default_value_t = DEFAULT_HISTORY)]
    history: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let users = match &args.token_auth_file {
        Some(p) => Users::load(p).map_err(anyhow::Error::msg)?,
        None => Users::default(),
    };
    let config = Config {
        mutating_webhooks: args.mutating_webhooks,
        validating_webhooks: args.validating_webhooks,
        webhook_ca: args.webhook_ca,
        webhook_exempt_namespaces: args.webhook_exempt_namespaces,
        users,
        history: args.history,
        tls: match (args.tls_cert_file, args.tls_private_key_file) {
            (Some(cert), Some(key)) => Some(ServingCert {
                cert,
                key,
                ca: args.kubeconfig_ca,
            }),
            _ => None,
        },
    };
    let server = Standin::start(args.listen, config).await?;
    if let Some(path) = &args.kubeconfig_out {
        let text = server.kubeconfig(args.kubeconfig_token.as_deref());
        std::fs::write(path, text)
            .with_context(|| format!("cannot write the kubeconfig to {}", path.display()))?;
    }
    println!("{}", server.addr().port());
    eprintln!("kube-standin serving {}", server.url());
    tokio::select! {
        _ = server.wait() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
