//! This container's place on a card, and what it takes from the other slices there.
//!
//! The card file is writable by every tenant on the node, so it is input, not state: each refresh writes this
//! container's own entry (`pwrite` at its own offset), copies the whole file out (`pread`), and keeps of the
//! others only entries a live process holds (see `card_layout`: liveness is a kernel lock, not a word) whose
//! words are plausible. What survives can only place this slice's window and say whether anyone else wants the
//! card; how long the window is, the policy, and the debt come from this process alone ([`crate::window`]).
//! Whatever is wrong with the card (missing, a link, a FIFO, a directory, truncated, full), the slice says so
//! once and paces alone at its own share.

use crate::log;
use std::path::{Path, PathBuf};
use vgpu_contract::card_layout::{CardFile, Entry, ENTRIES};
use vgpu_contract::limits::{valid_pacing_period, CorePolicy};

/// Activity stamped this far past our own clock is not a clock's jitter but a claim: the entry is ignored.
pub const FUTURE_SLACK_NS: u64 = 50_000_000;

/// Another slice on the card, as far as it is believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub index: usize,
    pub share: u32,
    pub policy: CorePolicy,
    pub last_active_ns: u64,
    pub period_ns: u64,
}

/// What one refresh saw: the believable peers, and this container's entry (None: pacing outside the table).
#[derive(Debug, Default, Clone)]
pub struct View {
    pub peers: Vec<Peer>,
    pub me: Option<usize>,
}

/// Why an entry of another slice is not believed, or None if it is (liveness aside).
pub fn implausible(e: &Entry, now_ns: u64) -> Option<String> {
    if !(1..=99).contains(&e.share) {
        return Some(format!("share {}%", e.share));
    }
    if e.policy != CorePolicy::Default.code() && e.policy != CorePolicy::Force.code() {
        return Some(format!("policy code {}", e.policy));
    }
    if !valid_pacing_period(e.period_ns) {
        return Some(format!("period of {} ns", e.period_ns));
    }
    if e.last_active_ns > now_ns.saturating_add(FUTURE_SLACK_NS) {
        return Some(format!(
            "activity {} ms in the future",
            (e.last_active_ns - now_ns) / 1_000_000
        ));
    }
    None
}

fn to_peer(e: &Entry) -> Peer {
    Peer {
        index: e.index,
        share: e.share,
        policy: if e.policy == CorePolicy::Force.code() {
            CorePolicy::Force
        } else {
            CorePolicy::Default
        },
        last_active_ns: e.last_active_ns,
        period_ns: e.period_ns,
    }
}

/// The believable others among `entries`: not this container's, plausible, and held by a live process.
pub fn believable(
    entries: &[Entry],
    me: Option<usize>,
    key: u64,
    now_ns: u64,
    held: impl Fn(usize) -> bool,
    mut reject: impl FnMut(&Entry, String),
) -> Vec<Peer> {
    entries
        .iter()
        .filter(|e| Some(e.index) != me && e.key != key)
        .filter(|e| match implausible(e, now_ns) {
            Some(why) => {
                // A dead entry's leftovers are not worth a word; a live one lying is.
                if held(e.index) {
                    reject(e, why);
                }
                false
            }
            None => held(e.index),
        })
        .map(to_peer)
        .collect()
}

/// The period this slice paces by: its own, or a shorter one a believable peer asks for so that windows line
/// up. Never longer than its own: a period word cannot make this slice wait longer than it asked to.
pub fn period(own_ns: u64, peers: &[Peer]) -> u64 {
    peers
        .iter()
        .map(|p| p.period_ns)
        .filter(|p| valid_pacing_period(*p))
        .fold(own_ns, u64::min)
}

/// How often a slice pacing alone tries the card again (it may have been repaired or removed).
pub const RETRY_NS: u64 = 1_000_000_000;

/// This container's membership of one card.
pub struct Membership {
    dir: PathBuf,
    uuid: String,
    key: u64,
    card: Option<CardFile>,
    me: Option<usize>,
    /// The card was unusable at the last refresh (said once per change).
    broken: bool,
    lie_reported: bool,
    /// The others as last read from a whole card, and this container's entry then: while the card is
    /// unusable the slice keeps its window where it was, instead of every slice falling back to the start of
    /// the period on top of one another.
    last_good: View,
    next_retry: u64,
    next_rejoin: u64,
}

impl Membership {
    /// Opens the card of GPU `uuid` in `dir` and claims this container's entry, written as `mine`. Never fails:
    /// a card that cannot be used leaves the slice pacing alone (tried again every [`RETRY_NS`]), with one
    /// message.
    pub fn join(dir: &Path, uuid: &str, mine: Entry, now_ns: u64) -> Membership {
        let mut m = Membership {
            dir: dir.to_path_buf(),
            uuid: uuid.to_string(),
            key: mine.key,
            card: None,
            me: None,
            broken: false,
            lie_reported: false,
            last_good: View::default(),
            next_retry: now_ns + RETRY_NS,
            next_rejoin: now_ns + RETRY_NS,
        };
        m.open(mine);
        m
    }

    fn open(&mut self, mine: Entry) {
        match CardFile::open(&self.dir, &self.uuid) {
            Ok(card) => {
                self.me = card.join(mine);
                if self.me.is_none() {
                    log::warn(&format!(
                        "card {}: every entry of the card file is held by another slice; this container paces at its own share without announcing itself",
                        self.uuid
                    ));
                }
                self.card = Some(card);
            }
            Err(e) => self.report_broken(&format!(
                "card directory: {e}; this container paces alone at its own share (ask the node's administrator to remove what is there)"
            )),
        }
    }

    fn report_broken(&mut self, msg: &str) {
        if !std::mem::replace(&mut self.broken, true) {
            log::warn(msg);
        }
    }

    /// What to pace by while the card is unusable: the last good view, every slice in it taken as active.
    fn fallback(&self, now_ns: u64) -> View {
        View {
            peers: self
                .last_good
                .peers
                .iter()
                .map(|p| Peer {
                    last_active_ns: now_ns,
                    ..*p
                })
                .collect(),
            me: self.last_good.me,
        }
    }

    /// With no entry (the table was full when this slice came), tries again to claim one, at most every
    /// [`RETRY_NS`]: once a tenant holding the table lets go, the slice shows itself again. (Used with agent
    /// windows, where the entry only announces the slice and never places it.)
    pub fn rejoin(&mut self, mine: Entry, now_ns: u64) {
        if self.me.is_some() || now_ns < self.next_rejoin {
            return;
        }
        self.next_rejoin = now_ns + RETRY_NS;
        if let Some(card) = &self.card {
            self.me = card.join(mine);
            if let Some(i) = self.me {
                log::info(&format!(
                    "card {}: an entry is free again; this container holds entry {i}",
                    self.uuid
                ));
            }
        }
    }

    /// Whether a slice on the card could be hidden from this one: this slice has no entry or no usable card,
    /// or every entry of the table is held by a live process (up to 64 lock queries; asked only by a `default`
    /// slice that would otherwise run free). An honest card has free entries: the scheduler puts at most
    /// `deviceSplitCount` slices on it.
    pub fn crowded(&self) -> bool {
        match (&self.card, self.me) {
            (Some(card), Some(me)) => (0..ENTRIES).all(|i| i == me || card.held_by_another(i)),
            _ => true,
        }
    }

    /// Writes this container's entry (`mine`, placed at its index) and reads the others.
    pub fn refresh(&mut self, mine: Entry, now_ns: u64) -> View {
        if self.card.as_ref().is_some_and(|c| !c.still_in_place()) {
            // Removed or replaced: slices opening the card from now on would not see this one. Follow them.
            self.card = None;
            self.me = None;
            self.report_broken(&format!(
                "card {}: the card file was removed or replaced; joining whatever is there now, at its own share meanwhile",
                self.uuid
            ));
            self.next_retry = now_ns;
        }
        if self.card.is_none() && now_ns >= self.next_retry {
            self.next_retry = now_ns + RETRY_NS;
            self.open(mine);
        }
        let Some(card) = &self.card else {
            return self.fallback(now_ns);
        };
        let entries = match card.read() {
            Ok(e) => e,
            Err(why) => {
                let msg = format!(
                    "card {}: {why}; this container keeps its window at its own share until the card file is whole again",
                    self.uuid
                );
                self.report_broken(&msg);
                return self.fallback(now_ns);
            }
        };
        if std::mem::replace(&mut self.broken, false) {
            log::info(&format!("card {}: usable again", self.uuid));
        }
        if let Some(i) = self.me {
            // Processes of one container share the entry: the latest activity any of them wrote stands, so an
            // idle sibling does not make the container look idle (a value from the future is not kept).
            let sibling_active = entries
                .iter()
                .find(|e| e.index == i && e.key == mine.key)
                .map(|e| e.last_active_ns)
                .filter(|&t| t <= now_ns.saturating_add(FUTURE_SLACK_NS))
                .unwrap_or(0);
            let _ = card.write_entry(&Entry {
                index: i,
                last_active_ns: mine.last_active_ns.max(sibling_active),
                ..mine
            });
        }
        let uuid = &self.uuid;
        let reported = &mut self.lie_reported;
        let peers = believable(
            &entries,
            self.me,
            self.key,
            now_ns,
            |i| card.held_by_another(i),
            |e, why| {
                if !std::mem::replace(reported, true) {
                    log::warn(&format!(
                        "card {uuid}: entry {} claims {why}; ignored (a slice can write anything there)",
                        e.index
                    ));
                }
            },
        );
        self.last_good = View {
            peers: peers.clone(),
            me: self.me,
        };
        View { peers, me: self.me }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const MS: u64 = 1_000_000;

    fn e(index: usize, share: u32, active: u64, period_ms: u64) -> Entry {
        Entry {
            index,
            key: 100 + index as u64,
            share,
            policy: CorePolicy::Force.code(),
            last_active_ns: active,
            period_ns: period_ms * MS,
            ..Default::default()
        }
    }

    #[test]
    fn only_plausible_live_entries_of_others_are_believed() {
        let now = 1_000_000 * MS;
        let es = [
            e(0, 30, now, 50),                  // me
            e(1, 50, now, 50),                  // fine
            e(2, 150, now, 50),                 // share out of range
            e(3, 40, now + 3_600_000 * MS, 50), // activity an hour ahead
            e(4, 40, now, 7),                   // period no slice could ask for
            e(5, 20, now, 50),                  // dead: no one holds it
            Entry {
                key: 7,
                ..e(6, 20, now, 50)
            }, // a sibling of mine at another index
            Entry {
                policy: 2,
                ..e(7, 20, now, 50)
            },
        ];
        let mut rejected = Vec::new();
        let peers = believable(
            &es,
            Some(0),
            7,
            now,
            |i| i != 5,
            |e, why| rejected.push((e.index, why)),
        );
        assert_eq!(peers.iter().map(|p| p.index).collect::<Vec<_>>(), vec![1]);
        let idx: Vec<usize> = rejected.iter().map(|r| r.0).collect();
        assert_eq!(idx, vec![2, 3, 4, 7], "{rejected:?}");
        assert!(rejected[1].1.contains("future"));
    }

    #[test]
    fn the_period_is_never_longer_than_ones_own() {
        let p = |ms: u64| Peer {
            index: 1,
            share: 10,
            policy: CorePolicy::Force,
            last_active_ns: 0,
            period_ns: ms * MS,
        };
        assert_eq!(period(500 * MS, &[]), 500 * MS);
        assert_eq!(period(500 * MS, &[p(5000)]), 500 * MS, "a 5 s period word");
        assert_eq!(
            period(500 * MS, &[p(50), p(200)]),
            50 * MS,
            "a shorter one lines windows up"
        );
        assert_eq!(period(50 * MS, &[p(500)]), 50 * MS);
    }
}
