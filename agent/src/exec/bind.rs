//! Tells the node agent about the slice (its cgroup, cache file and limits), so the agent binds the slice from
//! what `exec` saw and not from a file inside the slice (`contract::agent_socket`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vgpu_contract::agent_socket::{ExecBinding, Reply, Request};

pub use vgpu_contract::agent_socket::BIND_SOCKET as DEFAULT_BIND_SOCKET;

/// What came of asking the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Bound,
    /// No agent listening: the shim alone holds the slice.
    NoAgent(String),
    Refused(String),
}

fn ask(socket: &Path, req: &Request) -> std::io::Result<Reply> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

pub fn bind(socket: &Path, b: ExecBinding) -> Outcome {
    match ask(socket, &Request::Bind(b)) {
        Ok(Reply::Ok) => Outcome::Bound,
        Ok(Reply::Error(e)) => Outcome::Refused(e),
        Err(e) => Outcome::NoAgent(format!("{}: {e}", socket.display())),
    }
}

pub fn unbind(socket: &Path, cgroup: &str) {
    let _ = ask(
        socket,
        &Request::Unbind {
            cgroup: cgroup.to_string(),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_request_reaches_the_agent_and_its_answer_comes_back() {
        let dir = std::env::temp_dir().join(format!("vgpu-bind-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("bind.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = vec![];
            for answer in [r#""ok""#, r#"{"error":"not your cgroup"}"#] {
                let (s, _) = l.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                seen.push(serde_json::from_str::<Request>(&line).unwrap());
                (&s).write_all(format!("{answer}\n").as_bytes()).unwrap();
            }
            seen
        });
        let b = ExecBinding {
            cgroup: "/vgpu-exec/a".into(),
            cache: "/run/vgpu/exec/a.cache".into(),
            memory_limits: [(0, 4000 << 20)].into(),
            sm_limit: 0,
            policy: "default".into(),
            pid: 7,
        };
        assert_eq!(bind(&sock, b.clone()), Outcome::Bound);
        assert_eq!(
            bind(&sock, b.clone()),
            Outcome::Refused("not your cgroup".into())
        );
        assert_eq!(
            server.join().unwrap(),
            [Request::Bind(b.clone()), Request::Bind(b)]
        );
        assert!(matches!(
            bind(
                &dir.join("none.sock"),
                ExecBinding {
                    cgroup: String::new(),
                    cache: String::new(),
                    memory_limits: Default::default(),
                    sm_limit: 0,
                    policy: String::new(),
                    pid: 0
                }
            ),
            Outcome::NoAgent(_)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
