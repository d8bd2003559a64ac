//! gRPC over unix sockets, both ways: the kubelet serves `kubelet.sock` and PodResources, and dials each
//! plugin's socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};

/// Binds `path`, replacing a stale socket left by an earlier run (as the kubelet does at start).
pub fn bind(path: &Path) -> anyhow::Result<UnixListenerStream> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing the stale socket {}", path.display()))
        }
    }
    let l = UnixListener::bind(path).with_context(|| {
        format!(
            "binding {} (is another kubelet harness using this directory?)",
            path.display()
        )
    })?;
    Ok(UnixListenerStream::new(l))
}

/// Connects to the gRPC server on `path`, failing after `timeout` (the kubelet dials plugins with a
/// 10 s blocking dial).
pub async fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Channel> {
    let socket: PathBuf = path.to_path_buf();
    // The URI is required by tonic but unused: the connector below always dials the socket.
    let endpoint = Endpoint::from_static("http://[::1]:1").connect_timeout(timeout);
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_| {
        let socket = socket.clone();
        async move { UnixStream::connect(socket).await.map(TokioIo::new) }
    }));
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| anyhow::anyhow!("no answer on {} within {timeout:?}", path.display()))?
        .with_context(|| format!("dialing {}", path.display()))
}

/// Go's name for a gRPC code: the kubelet quotes errors as `rpc error: code = <Name> desc = <message>`.
pub fn go_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// A gRPC error as grpc-go prints it (what the kubelet puts in pod status messages).
pub fn go_error(s: &tonic::Status) -> String {
    format!(
        "rpc error: code = {} desc = {}",
        go_code_name(s.code()),
        s.message()
    )
}
