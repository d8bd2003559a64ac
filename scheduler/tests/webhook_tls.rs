//! The admission webhook as the API server calls it: an AdmissionReview over HTTPS.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use vgpu_scheduler::webhook::server::{router, serve_tls, WebhookState};
use vgpu_scheduler::webhook::{tls, ClusterLimits, Writers};

const CERT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/webhook-test.crt"
);
const CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test-ca.crt");
const KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/webhook-test.key"
);

async fn start() -> std::net::SocketAddr {
    start_with(tls::server_config(CERT.as_ref(), KEY.as_ref()).unwrap()).await
}

async fn start_with(cfg: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
    let state = Arc::new(WebhookState {
        scheduler_name: "vgpu-scheduler".into(),
        writers: Writers::default(),
        limits: Box::new(|| ClusterLimits {
            max_card_mem_mib: Some(15360),
            max_cards_per_node: Some(1),
        }),
        ready: Box::new(|| true),
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_tls(l, cfg, router(state)));
    addr
}

async fn post(addr: std::net::SocketAddr, body: Value) -> Value {
    post_to(addr, "/mutate", CA, body).await.unwrap()
}

async fn post_trusting(
    addr: std::net::SocketAddr,
    ca: &str,
    body: Value,
) -> Result<Value, std::io::Error> {
    post_to(addr, "/mutate", ca, body).await
}

async fn post_to(
    addr: std::net::SocketAddr,
    path: &str,
    ca: &str,
    body: Value,
) -> Result<Value, std::io::Error> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("content-type", "application/json")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    Ok(serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap())
}

fn review(uid: &str, limits: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "gpumem-pod-a", "namespace": "default", "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpumem-pod-a", "namespace": "default"},
                       "spec": {"containers": [{"name": "app", "image": "nvidia/cuda:12.4.1-base-ubuntu22.04", "resources": {"limits": limits}}]}},
            "dryRun": false
        }
    })
}

#[tokio::test]
async fn vgpu_pod_gets_our_scheduler_over_tls() {
    let addr = start().await;
    let r = post(
        addr,
        review(
            "705ab4f5-6393-11e8-b7cc-42010a800002",
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4000"}),
        ),
    )
    .await;
    let resp = &r["response"];
    assert_eq!(r["kind"], "AdmissionReview");
    assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["patchType"], "JSONPatch");
    let patch = base64_decode(resp["patch"].as_str().unwrap_or_else(|| panic!("{r}")));
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    assert_eq!(
        patch,
        json!([{"op": "add", "path": "/spec/schedulerName", "value": "vgpu-scheduler"}])
    );
}

#[tokio::test]
async fn impossible_requests_are_refused_over_tls() {
    let addr = start().await;
    let r = post(
        addr,
        review(
            "u2",
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "40000"}),
        ),
    )
    .await;
    assert_eq!(r["response"]["allowed"], false);
    assert_eq!(
        r["response"]["status"]["message"],
        "vgpu: pod default/gpumem-pod-a: container \"app\" asks 40000 MiB of nvidia.com/gpumem per vGPU, but the largest registered GPU has 15360 MiB"
    );
    let r = post(
        addr,
        review(
            "u3",
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpucores": "101"}),
        ),
    )
    .await;
    assert_eq!(r["response"]["allowed"], false);
    assert!(r["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("nvidia.com/gpucores is 101, want 0 to 100"));
    let r = post(addr, review("u4", json!({"cpu": "1"}))).await;
    assert_eq!(r["response"]["allowed"], true);
    assert!(r["response"].get("patch").is_none());
    let r = post(addr, json!({"garbage": true})).await;
    assert_eq!(r["response"]["allowed"], false);
}

/// The validating route as the API server calls it on UPDATE: the same edit of the scheduler's
/// annotation is refused for a tenant and allowed for the scheduler's service account.
#[tokio::test]
async fn validate_route_judges_updates_by_who_sends_them() {
    let addr = start().await;
    let old = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "gpumem-pod-a", "namespace": "default", "labels": {"hami.io/vgpu-node": "n1"},
                     "annotations": {"hami.io/vgpu-devices-allocated": "GPU-0,NVIDIA,4000,0:;"}},
        "spec": {"nodeName": "n1", "schedulerName": "vgpu-scheduler",
                 "containers": [{"name": "app", "image": "cuda", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}});
    let mut new = old.clone();
    new["metadata"]["annotations"]["hami.io/vgpu-devices-allocated"] = json!("GPU-0,NVIDIA,1,0:;");
    let body = |user: &str| {
        let mut r = review("u5", json!({}));
        r["request"]["operation"] = json!("UPDATE");
        r["request"]["userInfo"] = json!({"username": user, "groups": ["system:authenticated"]});
        r["request"]["object"] = new.clone();
        r["request"]["oldObject"] = old.clone();
        r
    };
    let r = post_to(addr, "/validate", CA, body("tenant"))
        .await
        .unwrap();
    assert_eq!(r["response"]["uid"], "u5");
    assert_eq!(r["response"]["allowed"], false, "{r}");
    assert!(r["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("annotation \"hami.io/vgpu-devices-allocated\""));
    let r = post_to(
        addr,
        "/validate",
        CA,
        body("system:serviceaccount:vgpu-system:vgpu-scheduler"),
    )
    .await
    .unwrap();
    assert_eq!(r["response"]["allowed"], true, "{r}");
    assert!(r["response"].get("patch").is_none());
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// cert-manager renews the Secret in place: the webhook serves the new certificate without a
/// restart.
#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("vgpu-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::copy(CERT, &cert).unwrap();
    std::fs::copy(KEY, &key).unwrap();
    let cfg = tls::server_config_reloading(&cert, &key, std::time::Duration::ZERO).unwrap();
    let addr = start_with(cfg).await;
    let body = || review("u", json!({"cpu": "1"}));
    let rotated_ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rotated-ca.crt");
    assert!(post_trusting(addr, CA, body()).await.is_ok());
    assert!(
        post_trusting(addr, rotated_ca, body()).await.is_err(),
        "the old certificate is not from the new CA"
    );

    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    std::fs::copy(format!("{fixtures}/rotated.crt"), &cert).unwrap();
    std::fs::copy(format!("{fixtures}/rotated.key"), &key).unwrap();
    // Make sure the modification time moves even on coarse-grained file systems.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    std::fs::File::options()
        .write(true)
        .open(&cert)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert!(
        post_trusting(addr, rotated_ca, body()).await.is_ok(),
        "the renewed certificate is served"
    );
    assert!(post_trusting(addr, CA, body()).await.is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
