//! The host's processes as the agent needs them: start time (to tell a reused pid), pid namespace and the
//! pid inside it (cache-file slots hold container pids) and cgroup. Which libcuda a process maps is
//! [`crate::ebpf::libcuda_id`]'s.

use std::collections::HashMap;
use std::path::Path;

use vgpu_contract::cache_layout::process_start_time;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub start_time: u64,
    pub pid_ns: u64,
    /// The pid as the process's own (innermost) pid namespace numbers it.
    pub ns_pid: u32,
    /// cgroup v2 path, e.g. "/kubepods.slice/.../cri-containerd-<id>.scope".
    pub cgroup: String,
}

pub fn read_proc(proc_root: &Path, pid: u32) -> Option<Proc> {
    let dir = proc_root.join(pid.to_string());
    let start_time = if proc_root == Path::new("/proc") {
        process_start_time(pid)?
    } else {
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        stat[stat.rfind(')')? + 2..]
            .split(' ')
            .nth(19)?
            .parse()
            .ok()?
    };
    let pid_ns = std::fs::metadata(dir.join("ns/pid"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    let ns_pid = parse_ns_pid(&status).unwrap_or(pid);
    let cgroup = parse_cgroup(&std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default())
        .unwrap_or_default();
    Some(Proc {
        pid,
        start_time,
        pid_ns,
        ns_pid,
        cgroup,
    })
}

/// The innermost pid of the `NSpid:` line of /proc/PID/status.
pub fn parse_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last()?.parse().ok())
}

/// The cgroup v2 path from /proc/PID/cgroup (the `0::` line).
pub fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

pub fn pids(proc_root: &Path) -> Vec<u32> {
    std::fs::read_dir(proc_root)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A snapshot of every process, indexed both ways.
#[derive(Debug, Default)]
pub struct ProcTable {
    pub by_pid: HashMap<u32, Proc>,
    by_ns: HashMap<(u64, u32), u32>,
}

impl ProcTable {
    pub fn scan() -> Self {
        let root = Path::new("/proc");
        Self::from_procs(pids(root).into_iter().filter_map(|p| read_proc(root, p)))
    }

    pub fn from_procs(procs: impl IntoIterator<Item = Proc>) -> Self {
        let mut t = Self::default();
        for p in procs {
            t.by_ns.insert((p.pid_ns, p.ns_pid), p.pid);
            t.by_pid.insert(p.pid, p);
        }
        t
    }

    /// The host pid of `ns_pid` in pid namespace `pid_ns`, if such a process runs and started at `start_time`
    /// (0: unknown start, any process will do).
    pub fn host_pid(&self, pid_ns: u64, ns_pid: u32, start_time: u64) -> Option<u32> {
        let host = *self.by_ns.get(&(pid_ns, ns_pid))?;
        let p = &self.by_pid[&host];
        (start_time == 0 || p.start_time == start_time).then_some(host)
    }

    pub fn alive(&self, pid: u32, start_time: u64) -> bool {
        self.by_pid
            .get(&pid)
            .is_some_and(|p| start_time == 0 || p.start_time == start_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_cgroup() {
        assert_eq!(
            parse_ns_pid("Name:\tx\nNSpid:\t4242\t17\t1\nNSpgid: 1\n"),
            Some(1)
        );
        assert_eq!(parse_ns_pid("NSpid:\t4242\n"), Some(4242));
        assert_eq!(
            parse_cgroup("0::/kubepods.slice/x.scope\n"),
            Some("/kubepods.slice/x.scope".into())
        );
        assert_eq!(parse_cgroup("1:name=systemd:/\n"), None);
    }

    #[test]
    fn own_process_is_found_and_translated() {
        let t = ProcTable::scan();
        let me = std::process::id();
        let p = &t.by_pid[&me];
        assert!(t.alive(me, p.start_time));
        assert!(!t.alive(me, p.start_time + 1));
        assert_eq!(t.host_pid(p.pid_ns, p.ns_pid, p.start_time), Some(me));
        assert_eq!(
            t.host_pid(p.pid_ns + 1, p.ns_pid, 0),
            None,
            "another namespace's pid is another process"
        );
    }
}
