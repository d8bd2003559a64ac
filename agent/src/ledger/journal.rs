//! Every call the agent applies between two saves of its ledger is also appended to `<state file>.journal`
//! (a numbered JSON line each), so an agent that dies between saves loses nothing: the next one replays the
//! lines newer than the saved ledger. A save truncates the journal; the numbers make a crash between the save
//! and the truncation harmless.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ebpf::decode::Call;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub tgid: u32,
    /// The process's start time as the agent knew it when it applied the call.
    pub start: u64,
    pub cgroup_id: u64,
    pub call: Call,
}

pub struct Journal {
    file: std::fs::File,
    path: PathBuf,
}

pub fn path_for(state_file: &Path) -> PathBuf {
    state_file.with_extension("journal")
}

impl Journal {
    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(Self { file, path })
    }

    /// Appends the entries in one write.
    pub fn append(&mut self, entries: &[Entry]) -> std::io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(entries.len() * 128);
        for e in entries {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)
    }

    /// Empties the journal (its entries are in the ledger just saved).
    pub fn truncate(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The entries numbered after `after`, in order. A torn last line (the agent died mid-write) is skipped.
pub fn read(path: &Path, after: u64) -> Vec<Entry> {
    let Ok(f) = std::fs::File::open(path) else {
        return vec![];
    };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Entry>(&l).ok())
        .filter(|e| e.seq > after)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::decode::Space;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            tgid: 7,
            start: 99,
            cgroup_id: 3,
            call: Call::Alloc {
                space: Space::DevicePtr,
                handle: 0x1000 + seq,
                bytes: 1 << 20,
            },
        }
    }

    #[test]
    fn entries_after_the_saved_number_come_back_in_order_and_a_torn_line_is_skipped() {
        let dir = std::env::temp_dir().join(format!("vgpu-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = path_for(&dir.join("state.json"));
        let mut j = Journal::open(path.clone()).unwrap();
        j.append(&[entry(1), entry(2), entry(3)]).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"seq\":4,\"tgid\":7,\"sta")
            .unwrap();
        assert_eq!(read(&path, 1), vec![entry(2), entry(3)]);
        j.truncate().unwrap();
        j.append(&[entry(5)]).unwrap();
        assert_eq!(read(&path, 0), vec![entry(5)], "truncated, then appended");
        let _ = std::fs::remove_dir_all(dir);
    }
}
