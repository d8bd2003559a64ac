//! Where a slice's compute window lies in each pacing period (pure, no I/O).
//!
//! Time on a card is cut into periods aligned to CLOCK_MONOTONIC, which every container on the host shares.
//! Each paced slice that is active gets one window per period, its own share long (from its own limits, never
//! from the card), the windows laid end to end in card-entry order, so competing slices never hold the GPU at
//! the same time and each gets its share of real GPU time (time-sharing between contexts would otherwise split
//! overlaps and short both). A `default` slice with no other active slice on the card runs free.
//!
//! What others claim only places the window: the shares before this slice count up to `100 - own share` and no
//! further, so however much the card's other entries claim, the window fits in the period at full length.
//! Honest slices never claim more than the card has (the scheduler books at most 100% of it), so the cap
//! only bites on lies, or on shares overbooked by hand, where late windows then overlap instead of shrinking.
//!
//! Under Kubernetes the agent places the windows instead ([`plan_agent`]): each container's limits file (which
//! only the agent can write) gives it ranges of a fixed period that no other container on the card holds, and
//! the card file then decides nothing about where they lie; it only tells a `default` slice whether anyone
//! else wants the card.

use crate::pacing::peers::Peer;
use vgpu_contract::limits::{CorePolicy, CoreWindows, MAX_WINDOW_RANGES};

/// A slice that launched or waited within this long wants the card.
pub const ACTIVE_NS: u64 = 200_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// No gating: launch at will.
    Free,
    /// Launch only within [offset, offset + len) of each period.
    Window { offset_ns: u64, len_ns: u64 },
}

/// Where launches may run in each period: up to [`MAX_WINDOW_RANGES`] ranges, ascending and disjoint. The first
/// `n` of `ranges` are used; a range may be empty (a window all paid away as debt still marks where it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub period_ns: u64,
    pub n: usize,
    /// (offset, length) in ns from the start of each period.
    pub ranges: [(u64, u64); MAX_WINDOW_RANGES],
}

impl Windows {
    /// One range: what the card-file placement ([`plan`]) gives.
    pub fn one(period_ns: u64, offset_ns: u64, len_ns: u64) -> Self {
        let mut ranges = [(0, 0); MAX_WINDOW_RANGES];
        ranges[0] = (offset_ns, len_ns);
        Windows {
            period_ns,
            n: 1,
            ranges,
        }
    }

    /// The agent's windows from the limits file (already bounded and checked by the contract's parser).
    pub fn from_agent(w: &CoreWindows) -> Self {
        let mut ranges = [(0, 0); MAX_WINDOW_RANGES];
        let n = w.ranges.len().min(MAX_WINDOW_RANGES);
        for (r, (start, len)) in ranges.iter_mut().zip(&w.ranges) {
            *r = (start * 1000, len * 1000);
        }
        Windows {
            period_ns: w.period_ms * 1_000_000,
            n,
            ranges,
        }
    }

    pub fn used(&self) -> &[(u64, u64)] {
        &self.ranges[..self.n.min(MAX_WINDOW_RANGES)]
    }

    /// Total length of the ranges.
    pub fn len_ns(&self) -> u64 {
        self.used().iter().map(|r| r.1).sum()
    }

    /// The first `total_ns` of the ranges, in order (what is left after debt, or after the environment lowered
    /// the share). Never empty of ranges: a window paid away entirely keeps its place with no length.
    pub fn truncated(&self, total_ns: u64) -> Self {
        let mut out = *self;
        let mut left = total_ns;
        let mut n = 0;
        for (i, r) in self.used().iter().enumerate() {
            if left == 0 && i > 0 {
                break;
            }
            let len = r.1.min(left);
            out.ranges[i] = (r.0, len);
            left -= len;
            n = i + 1;
        }
        out.n = n.max(1);
        for r in &mut out.ranges[out.n..] {
            *r = (0, 0);
        }
        out
    }
}

/// The plan of a slice whose windows the node's agent placed (`agent`, from its read-only limits file): exactly
/// those ranges, cut to `share` of the period (the environment may lower the share, never move or widen the
/// windows). Under `default` the slice runs free while no believable peer on the card is active, as [`plan`]
/// does, and the card is not `crowded` (asked only then): with every entry held, an honest neighbour may have
/// found none and be invisible, and running free would run over its windows. So a tenant's claims, fake activity
/// or a full table, can only keep the slice at its share.
pub fn plan_agent(
    peers: &[Peer],
    agent: &Windows,
    share: u32,
    policy: CorePolicy,
    now_ns: u64,
    crowded: impl FnOnce() -> bool,
) -> Option<Windows> {
    let active = peers
        .iter()
        .any(|p| now_ns.saturating_sub(p.last_active_ns) <= ACTIVE_NS);
    if policy == CorePolicy::Default && !active && !crowded() {
        return None;
    }
    let share_ns = agent.period_ns * share.clamp(1, 99) as u64 / 100;
    Some(agent.truncated(agent.len_ns().min(share_ns)))
}

/// The plan of a slice of `share` percent in entry `me` (None: not in the card's table, so after everyone)
/// given the believable `peers` at `now_ns`.
pub fn plan(
    peers: &[Peer],
    me: Option<usize>,
    share: u32,
    policy: CorePolicy,
    now_ns: u64,
    period_ns: u64,
) -> Plan {
    let share = share.clamp(1, 99) as u64;
    let active: Vec<&Peer> = peers
        .iter()
        .filter(|p| now_ns.saturating_sub(p.last_active_ns) <= ACTIVE_NS)
        .collect();
    if policy == CorePolicy::Default && active.is_empty() {
        return Plan::Free;
    }
    let me = me.unwrap_or(usize::MAX);
    let before: u64 = active
        .iter()
        .filter(|p| p.index < me)
        .map(|p| p.share.clamp(1, 99) as u64)
        .sum();
    let offset_pct = before.min(100 - share);
    Plan::Window {
        offset_ns: period_ns * offset_pct / 100,
        len_ns: period_ns * share / 100,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(period_ms: u64, ranges: &[(u64, u64)]) -> Windows {
        Windows::from_agent(&CoreWindows {
            period_ms,
            ranges: ranges.to_vec(),
        })
    }

    #[test]
    fn agent_windows_are_kept_whatever_the_card_says() {
        let w = agent(500, &[(100_000, 150_000)]);
        let liars: Vec<Peer> = (0..64).map(|i| p(i, 99, Force, 0)).collect();
        let roomy = || false;
        assert_eq!(plan_agent(&liars, &w, 30, Force, 0, roomy), Some(w));
        assert_eq!(
            plan_agent(&[], &w, 30, Force, 0, roomy),
            Some(w),
            "alone too"
        );
        assert_eq!(
            plan_agent(&[], &w, 30, Default, 0, roomy),
            None,
            "default alone runs free"
        );
        assert_eq!(plan_agent(&liars, &w, 30, Default, 0, roomy), Some(w));
        let stale: Vec<Peer> = (0..63).map(|i| p(i, 99, Force, 0)).collect();
        assert_eq!(
            plan_agent(&stale, &w, 30, Default, 10 * ACTIVE_NS, || true),
            Some(w),
            "a full table of idle-looking entries may hide a neighbour: no running free"
        );
        assert_eq!(
            plan_agent(&stale, &w, 30, Default, 10 * ACTIVE_NS, roomy),
            None
        );
    }

    #[test]
    fn a_lower_share_or_debt_takes_the_first_part_of_the_windows() {
        let w = agent(500, &[(0, 100_000), (300_000, 50_000)]);
        assert_eq!(w.len_ns(), 150 * MS);
        let low = plan_agent(&[], &w, 20, Force, 0, || false).unwrap();
        assert_eq!(low.used(), &[(0, 100 * MS)]);
        let t = w.truncated(120 * MS);
        assert_eq!(t.used(), &[(0, 100 * MS), (300 * MS, 20 * MS)]);
        let none = w.truncated(0);
        assert_eq!(none.used(), &[(0, 0)], "its place kept, with no length");
        assert_eq!(
            plan_agent(&[], &w, 60, Force, 0, || false),
            Some(w),
            "never longer than the agent's windows"
        );
    }

    fn p(index: usize, share: u32, policy: CorePolicy, last_active_ns: u64) -> Peer {
        Peer {
            index,
            share,
            policy,
            last_active_ns,
            period_ns: PERIOD_NS,
        }
    }
    const MS: u64 = 1_000_000;
    const PERIOD_NS: u64 = 50 * MS;
    use CorePolicy::{Default, Force};

    #[test]
    fn force_alone_gets_its_share() {
        assert_eq!(
            plan(&[], Some(0), 30, Force, 0, PERIOD_NS),
            Plan::Window {
                offset_ns: 0,
                len_ns: 15 * MS
            }
        );
        assert_eq!(
            plan(&[], None, 30, Force, 0, PERIOD_NS),
            Plan::Window {
                offset_ns: 0,
                len_ns: 15 * MS
            },
            "outside the table too"
        );
    }

    #[test]
    fn default_alone_runs_free_until_someone_wants_the_card() {
        let now = 10_000 * MS;
        let mut others = vec![p(1, 50, Force, now - 5_000 * MS)];
        assert_eq!(
            plan(&others, Some(0), 30, Default, now, PERIOD_NS),
            Plan::Free,
            "the other slice is idle"
        );
        others[0].last_active_ns = now - MS;
        assert_eq!(
            plan(&others, Some(0), 30, Default, now, PERIOD_NS),
            Plan::Window {
                offset_ns: 0,
                len_ns: 15 * MS
            }
        );
        assert_eq!(
            plan(
                &[p(0, 30, Default, now)],
                Some(1),
                50,
                Force,
                now,
                PERIOD_NS
            ),
            Plan::Window {
                offset_ns: 15 * MS,
                len_ns: 25 * MS
            }
        );
    }

    #[test]
    fn windows_never_overlap_and_fit_the_period() {
        let shares = [40, 50, 10];
        let ws: Vec<(u64, u64)> = (0..3)
            .map(|me| {
                let others: Vec<Peer> = (0..3)
                    .filter(|&i| i != me)
                    .map(|i| p(i, shares[i], Force, 0))
                    .collect();
                match plan(&others, Some(me), shares[me], Force, 0, PERIOD_NS) {
                    Plan::Window { offset_ns, len_ns } => (offset_ns, len_ns),
                    Plan::Free => panic!("paced"),
                }
            })
            .collect();
        for w in ws.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{ws:?}");
        }
        assert_eq!(ws[2].0 + ws[2].1, PERIOD_NS);
    }

    /// Claims before this slice can move its window but never shorten it: 30% is 30% whatever the table says.
    #[test]
    fn others_claims_never_shorten_the_window() {
        let liars: Vec<Peer> = (0..63).map(|i| p(i, 99, Force, 0)).collect();
        assert_eq!(
            plan(&liars, Some(63), 30, Force, 0, PERIOD_NS),
            Plan::Window {
                offset_ns: 35 * MS,
                len_ns: 15 * MS
            }
        );
        assert_eq!(
            plan(&liars, None, 30, Force, 0, PERIOD_NS),
            Plan::Window {
                offset_ns: 35 * MS,
                len_ns: 15 * MS
            }
        );
        // Liars after this slice do not move it at all.
        let after: Vec<Peer> = (1..64).map(|i| p(i, 99, Force, 0)).collect();
        assert_eq!(
            plan(&after, Some(0), 30, Force, 0, PERIOD_NS),
            Plan::Window {
                offset_ns: 0,
                len_ns: 15 * MS
            }
        );
    }
}
