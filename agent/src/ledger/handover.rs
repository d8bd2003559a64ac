//! What one agent leaves the next: the saved ledger and journal, the pinned probes (see [`crate::ebpf::pins`]) or
//! a process holding them, and the lock that keeps two agents off one node. [`Predecessor`] reads what the
//! last agent left and tells whether the new one starts with nothing missed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ebpf::probes::Probes;
use crate::ebpf::procs::ProcTable;
use crate::ledger::book::Ledger;
use crate::ledger::state::State;

/// What a stopping agent leaves for its successor in the state file: the ledger's fields, and the holder.
/// (Spelled out rather than a flattened Ledger: serde's flatten cannot read its integer map keys back.)
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub struct Saved {
    #[serde(default)]
    procs: std::collections::HashMap<u32, crate::ledger::book::ProcMemory>,
    /// The process holding the stopped agent's probes (pid, start time), see [`hand_over_probes`].
    #[serde(default)]
    holder: Option<(u32, u64)>,
    /// Written by a clean stop, after the last event was applied. A crash leaves the sweep's last save,
    /// which may miss events already taken from the ring buffer unless the journal has them.
    #[serde(default)]
    clean: bool,
    /// Number of the last call in `procs`; the journal's later entries come after it.
    #[serde(default)]
    seq: u64,
    /// The agent kept a journal (so after a crash, this plus the journal is everything it applied).
    #[serde(default)]
    journal: bool,
    /// The containers' bindings (Allocate's and exec's): a restarted agent enforces the same limits.
    #[serde(default)]
    bindings: crate::ledger::bindings::Bindings,
}

/// What the previous agent left, read before this one loads its probes.
pub struct Predecessor {
    saved: Option<Saved>,
    /// Its probe holder, if still running (pid, start time).
    holder: Option<(u32, u64)>,
    links_pinned: bool,
    maps_pinned: bool,
    /// The saved ledger plus the journal is everything it applied (a clean stop, or a journal).
    complete: bool,
}

impl Predecessor {
    pub fn find(state_file: &Path, pins: Option<&Path>) -> Self {
        let saved: Option<Saved> = match std::fs::read_to_string(state_file) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| tracing::warn!("ignoring {}: {e}", state_file.display()))
                .ok(),
            Err(_) => None,
        };
        let holder = saved
            .as_ref()
            .and_then(|s| s.holder)
            .filter(|(pid, start)| {
                vgpu_contract::cache_layout::process_start_time(*pid) == Some(*start)
            });
        Self {
            complete: saved.as_ref().is_some_and(|s| s.clean || s.journal),
            holder,
            links_pinned: pins.is_some_and(|d| {
                std::fs::read_dir(d.join("links")).is_ok_and(|mut rd| rd.next().is_some())
            }),
            maps_pinned: pins.is_some_and(|d| d.join(vgpu_agent_ebpf_common::MAP_EVENTS).exists()),
            saved,
        }
    }

    /// Its events since its last save are in the journal and the pinned ring buffer, the latter complete if
    /// its probes stayed attached until ours are: pinned links, or its probe holder still alive.
    fn seamless(&self) -> bool {
        self.complete && self.maps_pinned && (self.links_pinned || self.holder.is_some())
    }

    /// Restores its ledger into `state` and replays its journal, then opens this agent's journal and saves.
    pub fn restore_into(&self, state: &mut State, state_file: &Path) {
        let journal_path = crate::ledger::journal::path_for(state_file);
        match &self.saved {
            Some(saved) => {
                state.restore(
                    Ledger {
                        procs: saved.procs.clone(),
                    },
                    !self.seamless(),
                );
                state.seq = saved.seq;
                state.bindings = saved.bindings.clone();
                let journaled = crate::ledger::journal::read(&journal_path, saved.seq);
                for e in &journaled {
                    state.replay(e);
                }
                if !journaled.is_empty() {
                    tracing::info!("replayed {} journaled call(s)", journaled.len());
                }
            }
            None => state.procs = ProcTable::scan(),
        }
        match crate::ledger::journal::Journal::open(journal_path) {
            Ok(j) => state.journal = Some(j),
            Err(e) => {
                tracing::warn!(
                    "no journal ({e}): an agent crash loses the calls since the last save"
                )
            }
        }
        // The replayed calls are in the ledger now: save it, which empties the journal for this agent.
        save(state, state_file, None, false);
    }

    /// Once this agent's probes are attached: ends the predecessor's probe holder (their release takes
    /// seconds; a call seen by both meanwhile is reported once, since they share the in-flight map) and says
    /// how the takeover went.
    pub fn end(&self, probes: &Probes) {
        if let Some((pid, _)) = self.holder {
            // SAFETY: kill(2) on a pid whose start time was just checked to be the holder's.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if self.seamless() {
            tracing::info!(
                "took over from the previous agent ({}): no call missed",
                if self.links_pinned {
                    format!("{} libcuda file(s) with pinned probes", probes.adopted())
                } else {
                    format!("probe holder pid {}", self.holder.map_or(0, |h| h.0))
                }
            );
        } else if self.saved.is_some() {
            tracing::info!(
                "restored the previous agent's ledger; calls made while no agent watched may be missing, so its \
                 processes are marked partial ({})",
                if !self.complete {
                    "it did not stop cleanly"
                } else if !self.maps_pinned {
                    "no pinned maps"
                } else {
                    "its probes were gone"
                }
            );
        }
    }
}

/// Holds `<state file>.lock` (flock) for as long as the returned file lives: one agent per state file. A
/// predecessor still stopping gets `wait` to let go.
pub fn one_agent(state_file: &Path, wait: Duration) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = state_file.with_extension("lock");
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| d.display().to_string())?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| path.display().to_string())?;
    let t = Instant::now();
    loop {
        // SAFETY: flock on a file descriptor we own; LOCK_NB makes it return at once.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        if t.elapsed() >= wait {
            bail!(
                "another vgpu-agent holds {} (one agent per node and state file)",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long the stopped agent's probes stay attached for a successor to take over (it ends this sooner).
pub const LINGER: Duration = Duration::from_secs(120);

/// Keeps this agent's uprobes attached for `linger` after it exits, in a child holding only their fds;
/// returns the child's (pid, start time).
///
/// Releasing a uprobe's bpf link waits a tasks-trace RCU grace period, one link after another: exiting with
/// ~50 links per libcuda file took ~9 s. With the links held elsewhere this process exits at once, and the
/// probes keep writing to the pinned ring buffer until the successor's are attached and it ends the child.
pub fn hand_over_probes(linger: Duration) -> Option<(u32, u64)> {
    let mut keep: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                let t = target.to_string_lossy();
                (t == "anon_inode:bpf_link" || t == "anon_inode:[perf_event]")
                    .then(|| e.file_name().to_str()?.parse().ok())?
            })
            .collect()
        })
        .unwrap_or_default();
    if keep.is_empty() {
        return None;
    }
    keep.sort_unstable();
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    let last_fd = (rl.rlim_cur.min(1 << 20) as i32).max(keep.iter().copied().max().unwrap_or(0));
    let ts = libc::timespec {
        tv_sec: linger.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: the child of this multi-threaded process only makes async-signal-safe calls (setsid, close,
    // nanosleep, _exit) on data prepared before the fork.
    let child = unsafe {
        let child = libc::fork();
        if child != 0 {
            child // parent (or fork failed: the links are released at exit as before)
        } else {
            // Out of the agent's session and process group, so a signal meant for the agent spares it.
            libc::setsid();
            // A name that says what it is in ps and top (it still carries the agent's command line).
            libc::prctl(libc::PR_SET_NAME, c"vgpu-probe-hold".as_ptr());
            // Everything but the probes: a listening socket held here would keep the successor from binding it.
            for fd in 0..=last_fd {
                if keep.binary_search(&fd).is_err() {
                    libc::close(fd);
                }
            }
            libc::nanosleep(&ts, std::ptr::null_mut());
            libc::_exit(0);
        }
    };
    if child <= 0 {
        return None;
    }
    let pid = child as u32;
    Some((pid, vgpu_contract::cache_layout::process_start_time(pid)?))
}

/// Saves the ledger and empties the journal, under the caller's lock, so no call lands in the journal between
/// the two and is lost.
pub fn save(state: &mut State, path: &Path, holder: Option<(u32, u64)>, clean: bool) {
    state.dirty = false;
    state.flush_journal();
    let text = serde_json::to_string(&Saved {
        procs: state.ledger.procs.clone(),
        holder,
        clean,
        seq: state.seq,
        journal: state.journal.is_some(),
        bindings: state.bindings.clone(),
    })
    .unwrap_or_default();
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    // Written aside and renamed, so a crash mid-write never leaves half a ledger.
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .is_err()
    {
        tracing::warn!("could not save {}", path.display());
        return;
    }
    if let Some(j) = state.journal.as_mut() {
        let _ = j.truncate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_agent_on_the_same_state_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("vgpu-lock-test-{}", std::process::id()));
        let state = dir.join("state.json");
        let first = one_agent(&state, Duration::ZERO).unwrap();
        let e = one_agent(&state, Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another vgpu-agent"), "{e}");
        drop(first);
        assert!(
            one_agent(&state, Duration::ZERO).is_ok(),
            "free once the first is gone"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn saved_state_round_trips_and_reads_the_older_format() {
        let mut l = Ledger::default();
        l.procs.insert(42, Default::default());
        l.procs.get_mut(&42).unwrap().total = 7;
        let text = serde_json::to_string(&Saved {
            procs: l.procs.clone(),
            holder: Some((9, 10)),
            clean: true,
            seq: 5,
            journal: true,
            bindings: Default::default(),
        })
        .unwrap();
        let back: Saved = serde_json::from_str(&text).unwrap();
        assert_eq!(back.holder, Some((9, 10)));
        assert!(back.clean);
        assert_eq!(back.procs[&42].total, 7);
        // A state file from before the hand-over: a bare ledger.
        let old = serde_json::to_string(&l).unwrap();
        let back: Saved = serde_json::from_str(&old).unwrap();
        assert_eq!(back.holder, None);
        assert!(
            !back.clean,
            "an old state file says nothing of how its agent stopped"
        );
        assert_eq!(back.procs[&42].total, 7);
    }
}
