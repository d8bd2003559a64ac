//! Where a slice's compute window lies in each pacing period (pure, no I/O).
//!
//! Time on a card is cut into periods (the card's, see `CardFile::period_ns`) aligned to CLOCK_MONOTONIC, which every container on
//! the host shares. Each paced slice that is active gets its share of every period as one window, the windows
//! laid end to end in card-entry order, so competing slices never hold the GPU at the same time and each gets
//! its share of real GPU time (time-sharing between contexts would otherwise split overlaps and short both).
//! Shares summing past 100 are scaled down to fit. A `default` slice with no other active slice on the card
//! runs free.

use vgpu_contract::card_layout::Entry;
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

/// The plan of the slice in entry `me` given every entry of the card at `now_ns`.
pub fn plan(entries: &[Entry], me: usize, policy: CorePolicy, now_ns: u64, period_ns: u64) -> Plan {
    let active = |e: &&Entry| e.index == me || now_ns.saturating_sub(e.last_active_ns) <= ACTIVE_NS;
    let paced: Vec<&Entry> = entries
        .iter()
        .filter(active)
        .filter(|e| e.share > 0 && e.share < 100 && e.policy != CorePolicy::Disable.code())
        .collect();
    let others_active = entries.iter().filter(active).any(|e| e.index != me);
    if policy == CorePolicy::Default && !others_active {
        return Plan::Free;
    }
    let Some(mine) = paced.iter().find(|e| e.index == me) else {
        return Plan::Free;
    };
    let total: u64 = paced.iter().map(|e| e.share as u64).sum();
    let scale = |share: u64| {
        if total > 100 {
            period_ns * share / total
        } else {
            period_ns * share / 100
        }
    };
    let offset_ns = paced
        .iter()
        .filter(|e| e.index < me)
        .map(|e| scale(e.share as u64))
        .sum();
    Plan::Window {
        offset_ns,
        len_ns: scale(mine.share as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: usize, share: u32, policy: CorePolicy, last_active_ns: u64) -> Entry {
        Entry {
            index,
            key: index as u64 + 1,
            share,
            policy: policy.code(),
            last_active_ns,
            launches: 0,
            throttled_ns: 0,
        }
    }
    const MS: u64 = 1_000_000;
    const PERIOD_NS: u64 = 50 * MS;

    #[test]
    fn force_alone_gets_its_share() {
        let es = [e(0, 30, CorePolicy::Force, 0)];
        assert_eq!(
            plan(&es, 0, CorePolicy::Force, 0, PERIOD_NS),
            Plan::Window {
                offset_ns: 0,
                len_ns: 15 * MS
            }
        );
    }

    #[test]
    fn default_alone_runs_free_until_someone_wants_the_card() {
        let now = 10_000 * MS;
        let mut es = vec![
            e(0, 30, CorePolicy::Default, now),
            e(1, 50, CorePolicy::Force, now - 5_000 * MS),
        ];
        assert_eq!(
            plan(&es, 0, CorePolicy::Default, now, PERIOD_NS),
            Plan::Free,
            "the other slice is idle"
        );
        es[1].last_active_ns = now - MS;
        assert_eq!(
            plan(&es, 0, CorePolicy::Default, now, PERIOD_NS),
            Plan::Window {
                offset_ns: 0,
                len_ns: 15 * MS
            }
        );
        assert_eq!(
            plan(&es, 1, CorePolicy::Force, now, PERIOD_NS),
            Plan::Window {
                offset_ns: 15 * MS,
                len_ns: 25 * MS
            }
        );
    }

    #[test]
    fn windows_never_overlap_and_fit_the_period() {
        let es: Vec<Entry> = [40, 50, 30]
            .iter()
            .enumerate()
            .map(|(i, s)| e(i, *s, CorePolicy::Force, 0))
            .collect();
        let ws: Vec<(u64, u64)> = (0..3)
            .map(|i| match plan(&es, i, CorePolicy::Force, 0, PERIOD_NS) {
                Plan::Window { offset_ns, len_ns } => (offset_ns, len_ns),
                Plan::Free => panic!("paced"),
            })
            .collect();
        for w in ws.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
        let last = ws[2];
        assert!(last.0 + last.1 <= PERIOD_NS);
    }

    #[test]
    fn uncapped_neighbours_take_no_window() {
        let es = [
            e(0, 0, CorePolicy::Default, 0),
            e(1, 30, CorePolicy::Force, 0),
        ];
        assert_eq!(
            plan(&es, 1, CorePolicy::Force, 0, PERIOD_NS),
            Plan::Window {
                offset_ns: 0,
                len_ns: 15 * MS
            }
        );
    }
}
