//! A stand-in Kubernetes API server: in memory, plain HTTP, speaking the REST and watch protocol that kubectl and
//! kube-rs use unchanged (discovery, CRUD, the four patch types, resourceVersion conflicts, pods/binding, admission
//! webhooks, static bearer tokens). For tests and benchmarks where no kube-apiserver can run.
//!
//! Not modeled: authorization (every user may do everything), graceful pod deletion (a delete removes the pod at
//! once), field ownership of server-side apply (an apply is a strategic merge), pagination (a list is one page).

pub mod admission;
pub mod errors;
pub mod event_views;
mod http;
pub mod objects;
pub mod patch;
pub mod pods;
pub mod quantity;
pub mod resources;
mod routes;
pub mod selectors;
pub mod store;
mod table;
pub mod tls;
pub mod users;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;

pub use admission::WebhookSpec;
pub use users::{UserInfo, Users};

/// Namespaces that exist from the start, as on a new cluster.
const INITIAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// How many changes watches can resume from; older resourceVersions get `410 Gone` (kube-rs and client-go list
/// again). Each kept change holds its object twice (value and JSON), so this bounds memory too.
pub const DEFAULT_HISTORY: usize = 20_000;

#[derive(Debug, Clone)]
pub struct Config {
    pub mutating_webhooks: Vec<WebhookSpec>,
    pub validating_webhooks: Vec<WebhookSpec>,
    /// CA bundle (PEM) that https webhooks' certificates chain to.
    pub webhook_ca: Option<PathBuf>,
    pub users: Users,
    pub history: usize,
    /// Serve HTTPS with this certificate chain and key (PEM) instead of plain HTTP.
    pub tls: Option<ServingCert>,
    /// Namespaces whose pods the webhooks are not called for (a webhook configuration's `namespaceSelector`
    /// excluding them, as deploy/scheduler's excludes kube-system and vgpu-system).
    pub webhook_exempt_namespaces: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServingCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that clients are to trust (written into kubeconfigs); the certificate itself if `None`.
    pub ca: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mutating_webhooks: Vec::new(),
            validating_webhooks: Vec::new(),
            webhook_ca: None,
            users: Users::default(),
            history: DEFAULT_HISTORY,
            tls: None,
            webhook_exempt_namespaces: Vec::new(),
        }
    }
}

/// A running server; stops accepting connections when dropped.
pub struct Standin {
    addr: SocketAddr,
    /// The CA clients trust when serving HTTPS.
    ca: Option<PathBuf>,
    task: tokio::task::JoinHandle<()>,
}

impl Standin {
    /// Binds `listen` (port 0 picks one) and serves on the current tokio runtime.
    pub async fn start(listen: SocketAddr, config: Config) -> anyhow::Result<Standin> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let admission = admission::Admission::new(
            &config.mutating_webhooks,
            &config.validating_webhooks,
            config.webhook_ca.as_ref(),
        )
        .context("cannot set up the admission webhooks' clients")?
        .exempting(config.webhook_exempt_namespaces.clone());
        let store = Arc::new(store::Store::new(config.history));
        for ns in INITIAL_NAMESPACES {
            let mut obj =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            let res = resources::find("", "v1", "namespaces").expect("namespaces are served");
            objects::prepare_create(res, &mut obj);
            store
                .create("namespaces", "", ns, obj)
                .map_err(|e| anyhow::anyhow!("creating namespace {ns}: {e:?}"))?;
        }
        let server = Arc::new(http::Server {
            store,
            admission,
            users: config.users,
            address: addr.to_string(),
        });
        let app = axum::Router::new()
            .fallback(http::handle)
            .with_state(server);
        let ca = config
            .tls
            .as_ref()
            .map(|t| t.ca.clone().unwrap_or_else(|| t.cert.clone()));
        let task = match &config.tls {
            None => tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("kube-standin stopped serving: {e}");
                }
            }),
            Some(t) => {
                let listener =
                    tls::TlsListener::new(listener, tls::server_config(&t.cert, &t.key)?)?;
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!("kube-standin stopped serving: {e}");
                    }
                })
            }
        };
        Ok(Standin { addr, ca, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A kubeconfig that points at this server, authenticating with `token` if given.
    pub fn kubeconfig(&self, token: Option<&str>) -> String {
        kubeconfig(&self.url(), token, self.ca.as_deref())
    }

    /// A kube-rs client of this server (anonymous, or the user of `token`).
    pub fn client(&self, token: Option<&str>) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("the server URL parses"));
        config.default_namespace = "default".into();
        if let Some(t) = token {
            config.auth_info.token = Some(t.to_string().into());
        }
        config.root_cert_file = self.ca.clone();
        kube::Client::try_from(config).expect("a client of this server builds")
    }

    /// Waits until the server stops (it does not by itself).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// kubeconfig YAML for the server at `url`, whose certificate chains to `ca` when it serves HTTPS.
pub fn kubeconfig(url: &str, token: Option<&str>, ca: Option<&std::path::Path>) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let user = match token {
        Some(t) => format!("    token: {}\n", quote(t)),
        None => "    {}\n".to_string(),
    };
    let ca = match ca {
        Some(p) => {
            let abs = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            format!(
                "    certificate-authority: {}\n",
                quote(&abs.to_string_lossy())
            )
        }
        None => String::new(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {url}\n{ca}\
         contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\n\
         current-context: standin\nusers:\n- name: standin\n  user:\n{user}preferences: {{}}\n"
    )
}
