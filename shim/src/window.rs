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

use crate::pacing::peers::Peer;
use vgpu_contract::limits::CorePolicy;

/// A slice that launched or waited within this long wants the card.
pub const ACTIVE_NS: u64 = 200_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// No gating: launch at will.
    Free,
    /// Launch only within [offset, offset + len) of each period.
    Window { offset_ns: u64, len_ns: u64 },
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
