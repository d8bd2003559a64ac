//! Where each container's compute windows lie on its cards: the agent, which every tenant trusts already (it
//! writes their read-only limits files), places them, so nothing a tenant can write decides where a
//! neighbour's window lies.
//!
//! Each card is paced in one fixed period (`pacingPeriodMs` in the node config, default the shim's 500 ms).
//! A container with a compute share of a card (1–99%) holds ranges of that period whose lengths add up to its
//! share and that no other container on the card holds: one range where a gap is long enough (first fit),
//! else pieces of the largest gaps (at most [`MAX_WINDOW_RANGES`]). The scheduler never books more than 100% of
//! a card's cores, so that always fits; when it does not (core scaling above 1, or a booking the agent did not
//! see go), the agent says so in its log and gives the container one range of its share where the fewest
//! others already are.
//!
//! The ranges reach the shim as `VGPU_CORE_WINDOWS_<cuda ordinal>` lines of the limits file (contract:
//! [`vgpu_contract::limits::parse_core_windows`]), added where the limits values are built ([`with_windows`]).
//! They are freed when the container's pod is gone or finished ([`release_gone`], run by the directory sweep
//! and before each placement), and a restarted agent takes them back from the limits files on disk
//! ([`WindowBook::recover_dir`]) before it confirms anything again, so running containers keep theirs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vgpu_contract::annotations::ContainerDevice;
use vgpu_contract::container_dir as cd;
use vgpu_contract::env;
use vgpu_contract::limits::{parse_core_windows, CoreWindows, MAX_WINDOW_RANGES};

use super::container_dir::{ContainerDir, Settings};
use super::Node;

/// A container placed this recently is never freed for not being in the pod reflector yet (Allocate may have
/// found its pod by a direct list the reflector has not caught up with; a watch is seconds behind at worst).
/// Short: until it ends, a short-lived pod's windows stay booked, and a newcomer on a full card would then
/// overlap someone.
pub const GRACE: Duration = Duration::from_secs(60);

/// (start, length) in µs from the start of each period.
pub type Range = (u64, u64);

/// What one placement gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub windows: CoreWindows,
    /// False when the card had no room: the ranges overlap others' (least-loaded part).
    pub fits: bool,
}

#[derive(Debug, Default)]
struct Card {
    period_ms: u64,
    /// Owner (the container's host directory name) → its ranges, ascending.
    held: BTreeMap<String, Vec<Range>>,
}

impl Card {
    fn others(&self, owner: &str) -> Vec<Range> {
        let mut r: Vec<Range> = self
            .held
            .iter()
            .filter(|(o, _)| o.as_str() != owner)
            .flat_map(|(_, r)| r.iter().copied())
            .collect();
        r.sort();
        r
    }
}

/// The node's window allocator: one [`Card`] per GPU UUID.
#[derive(Debug)]
pub struct WindowBook {
    period_ms: u64,
    cards: Mutex<HashMap<String, Card>>,
    placed_at: Mutex<HashMap<String, Instant>>,
}

/// Free gaps of a period of `period` µs around `taken` (sorted; may overlap each other).
fn gaps(period: u64, taken: &[Range]) -> Vec<Range> {
    let mut out = vec![];
    let mut at = 0;
    for &(s, l) in taken {
        if s > at {
            out.push((at, s - at));
        }
        at = at.max(s + l);
    }
    if at < period {
        out.push((at, period - at));
    }
    out
}

/// How much of `[s, s + len)` the ranges in `taken` already cover, counting each holder.
fn load(taken: &[Range], s: u64, len: u64) -> u64 {
    taken
        .iter()
        .map(|&(ts, tl)| (s + len).min(ts + tl).saturating_sub(s.max(ts)))
        .sum()
}

/// Ranges of `len` µs in a period of `period` µs that miss `taken`: the first gap long enough, else pieces of the
/// largest gaps (at most [`MAX_WINDOW_RANGES`]). When there is no such room: one range where `taken` is
/// thinnest, and false.
pub fn allocate(period: u64, taken: &[Range], len: u64) -> (Vec<Range>, bool) {
    let len = len.clamp(1, period);
    let free = gaps(period, taken);
    if let Some(&(s, _)) = free.iter().find(|g| g.1 >= len) {
        return (vec![(s, len)], true);
    }
    let mut by_size = free.clone();
    by_size.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut pieces = vec![];
    let mut left = len;
    for (s, l) in by_size.into_iter().take(MAX_WINDOW_RANGES) {
        let take = l.min(left);
        pieces.push((s, take));
        left -= take;
        if left == 0 {
            pieces.sort();
            return (pieces, true);
        }
    }
    // No room: the least-loaded stretch of the period, one range of its share.
    let mut starts: Vec<u64> = vec![0, period - len];
    for &(s, l) in taken {
        for b in [s, s + l] {
            starts.push(b.min(period - len));
            starts.push(b.saturating_sub(len).min(period - len));
        }
    }
    starts.sort();
    starts.dedup();
    let best = starts
        .into_iter()
        .min_by_key(|&s| (load(taken, s, len), s))
        .unwrap_or(0);
    (vec![(best, len)], false)
}

impl WindowBook {
    pub fn new(period_ms: u64) -> Self {
        WindowBook {
            period_ms,
            cards: Mutex::new(HashMap::new()),
            placed_at: Mutex::new(HashMap::new()),
        }
    }

    /// The windows of `owner` on card `uuid` for `share` percent: the ones it holds already (a confirmation
    /// made again after a restart gets the same), else newly placed.
    pub fn place(&self, owner: &str, uuid: &str, share: u32) -> Placed {
        let mut cards = self.cards.lock().unwrap();
        let card = cards.entry(uuid.to_string()).or_insert_with(|| Card {
            period_ms: self.period_ms,
            ..Card::default()
        });
        if card.held.is_empty() {
            card.period_ms = self.period_ms;
        }
        let period = card.period_ms * 1000;
        let len = period * share.clamp(1, 99) as u64 / 100;
        if let Some(r) = card.held.get(owner) {
            if r.iter().map(|r| r.1).sum::<u64>() == len {
                let taken = card.others(owner);
                let fits = r.iter().all(|&(s, l)| load(&taken, s, l) == 0);
                return Placed {
                    windows: CoreWindows {
                        period_ms: card.period_ms,
                        ranges: r.clone(),
                    },
                    fits,
                };
            }
        }
        let (ranges, fits) = allocate(period, &card.others(owner), len);
        card.held.insert(owner.to_string(), ranges.clone());
        self.placed_at
            .lock()
            .unwrap()
            .insert(owner.to_string(), Instant::now());
        Placed {
            windows: CoreWindows {
                period_ms: card.period_ms,
                ranges,
            },
            fits,
        }
    }

    /// Takes back windows a limits file on disk gives `owner` on card `uuid` (after a restart). Refused when
    /// they are in another period than the card's holders, or overlap them.
    pub fn recover(&self, owner: &str, uuid: &str, w: &CoreWindows) -> Result<(), String> {
        let mut cards = self.cards.lock().unwrap();
        let card = cards.entry(uuid.to_string()).or_default();
        if card.held.is_empty() {
            card.period_ms = w.period_ms;
        } else if card.period_ms != w.period_ms {
            return Err(format!(
                "{owner}: windows in {} ms periods where the card's others are in {} ms",
                w.period_ms, card.period_ms
            ));
        }
        let taken = card.others(owner);
        if w.ranges.iter().any(|&(s, l)| load(&taken, s, l) > 0) {
            return Err(format!("{owner}: windows {} overlap another's", w.render()));
        }
        card.held.insert(owner.to_string(), w.ranges.clone());
        self.placed_at
            .lock()
            .unwrap()
            .insert(owner.to_string(), Instant::now());
        Ok(())
    }

    /// Frees every window of `owner`.
    pub fn release(&self, owner: &str) {
        for card in self.cards.lock().unwrap().values_mut() {
            card.held.remove(owner);
        }
        self.placed_at.lock().unwrap().remove(owner);
    }

    /// The owners holding windows on any card.
    pub fn owners(&self) -> Vec<String> {
        let mut o: Vec<String> = self
            .cards
            .lock()
            .unwrap()
            .values()
            .flat_map(|c| c.held.keys().cloned())
            .collect();
        o.sort();
        o.dedup();
        o
    }

    /// Frees the windows of owners `keep` says no to, unless placed within [`GRACE`] of `now`. Returns them.
    pub fn retain(&self, now: Instant, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let placed = self.placed_at.lock().unwrap().clone();
        let gone: Vec<String> = self
            .owners()
            .into_iter()
            .filter(|o| !keep(o))
            .filter(|o| {
                placed
                    .get(o)
                    .is_none_or(|t| now.saturating_duration_since(*t) >= GRACE)
            })
            .collect();
        for o in &gone {
            self.release(o);
        }
        gone
    }

    /// Takes back the windows of every ready limits file under `containers_dir` (run once at start, before
    /// anything is confirmed again). Returns how many containers were taken back.
    pub fn recover_dir(&self, containers_dir: &Path) -> usize {
        let Ok(rd) = std::fs::read_dir(containers_dir) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.flatten() {
            let owner = e.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(e.path().join(cd::LIMITS_NAME)).unwrap_or_default();
            let Ok(kv) = vgpu_contract::limits::parse_limits_file(&text) else {
                continue;
            };
            if cd::limits_state(&kv) != Ok(cd::LimitsState::Ready) {
                continue;
            }
            let uuids: Vec<&str> = kv
                .iter()
                .rev()
                .find(|(k, _)| k == env::NVIDIA_VISIBLE_DEVICES)
                .map(|(_, v)| v.split(',').map(str::trim).collect())
                .unwrap_or_default();
            let mut any = false;
            for (k, v) in &kv {
                let Some(i) = k
                    .strip_prefix(cd::CORE_WINDOWS_PREFIX)
                    .and_then(|i| i.parse::<usize>().ok())
                else {
                    continue;
                };
                let (Some(uuid), Ok(w)) = (uuids.get(i), parse_core_windows(v)) else {
                    tracing::warn!("{owner}: {k}={v} not taken back (no device, or not windows)");
                    continue;
                };
                match self.recover(&owner, uuid, &w) {
                    Ok(()) => any = true,
                    Err(why) => tracing::warn!("{why}; placed again when it is confirmed"),
                }
            }
            n += any as usize;
        }
        n
    }

    /// The `VGPU_CORE_WINDOWS_<i>` lines of a container whose host directory is named `owner`: one per device
    /// with a share of 1–99% (no share, or all of the card, is not paced).
    pub fn lines(&self, owner: &str, devices: &[ContainerDevice]) -> Vec<(String, String)> {
        let mut out = vec![];
        for (i, d) in devices.iter().enumerate() {
            if !(1..=99).contains(&d.cores) {
                continue;
            }
            let p = self.place(owner, &d.uuid, d.cores);
            if !p.fits {
                tracing::warn!(
                    "card {}: no room left in its period for {owner}'s {}%: it gets {} where the fewest others are (are the card's cores booked past 100%?)",
                    d.uuid,
                    d.cores,
                    p.windows.render()
                );
            }
            out.push((
                format!("{}{i}", cd::CORE_WINDOWS_PREFIX),
                p.windows.render(),
            ));
        }
        out
    }
}

/// The container's limits lines with its compute windows added: what `confirm` writes once the kubelet has
/// confirmed the container. Windows of containers whose pods are gone are freed first.
pub fn with_windows(
    node: &Node,
    dir: &ContainerDir,
    devices: &[ContainerDevice],
    lines: &Settings,
) -> Settings {
    release_gone(node);
    let owner = dir
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut s = lines.clone();
    s.0.extend(node.windows.lines(&owner, devices));
    s
}

/// Frees the windows of containers whose pod is no longer on the node or has finished.
pub fn release_gone(node: &Node) {
    let running: HashSet<String> = node
        .pods
        .state()
        .iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    let freed = node.windows.retain(Instant::now(), |owner| {
        // The directory's owner record (the pod the kubelet named), else a name of the older `<uid>_<container>` form.
        let dir = ContainerDir {
            dir: node.paths.containers_dir.join(owner),
        };
        dir.read_owner()
            .map(|o| o.uid)
            .or_else(|| owner.split_once('_').map(|(uid, _)| uid.to_string()))
            .is_some_and(|uid| running.contains(&uid))
    });
    for o in freed {
        tracing::info!("{o}: its pod is gone or finished; its compute windows are free");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 500_000;

    fn total(r: &[Range]) -> u64 {
        r.iter().map(|r| r.1).sum()
    }

    fn disjoint(all: &[Vec<Range>]) -> bool {
        let mut v: Vec<Range> = all.iter().flatten().copied().collect();
        v.sort();
        v.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0) && v.iter().all(|r| r.0 + r.1 <= P)
    }

    fn dev(uuid: &str, cores: u32) -> ContainerDevice {
        ContainerDevice::nvidia(uuid, 1000, cores)
    }

    #[test]
    fn a_card_fills_to_100_percent_without_overlap() {
        let b = WindowBook::new(500);
        let mut all = vec![];
        for (i, share) in [30, 40, 20, 10].into_iter().enumerate() {
            let p = b.place(&format!("u{i}_c"), "GPU-a", share);
            assert!(p.fits, "{share}: {p:?}");
            assert_eq!(p.windows.period_ms, 500);
            assert_eq!(total(&p.windows.ranges), P * share as u64 / 100);
            all.push(p.windows.ranges);
        }
        assert!(disjoint(&all), "{all:?}");
        assert_eq!(
            all,
            vec![
                vec![(0, 150_000)],
                vec![(150_000, 200_000)],
                vec![(350_000, 100_000)],
                vec![(450_000, 50_000)]
            ],
            "first fit lays them end to end"
        );
        // Another card is its own.
        assert_eq!(
            b.place("u9_c", "GPU-b", 50).windows.ranges,
            vec![(0, 250_000)]
        );
        // Full: the next one is told it does not fit, and lands on the least-loaded part.
        let over = b.place("u5_c", "GPU-a", 10);
        assert!(!over.fits);
        assert_eq!(total(&over.windows.ranges), 50_000);
    }

    #[test]
    fn freed_ranges_are_reused_and_fragments_are_pieced_together() {
        let b = WindowBook::new(500);
        for (o, s) in [
            ("a_c", 20),
            ("b_c", 20),
            ("c_c", 20),
            ("d_c", 20),
            ("e_c", 20),
        ] {
            assert!(b.place(o, "GPU-a", s).fits);
        }
        b.release("b_c");
        b.release("d_c");
        // 20% at 100–200 ms and 20% at 300–400 ms are free: a 30% container gets pieces of both.
        let p = b.place("f_c", "GPU-a", 30);
        assert!(p.fits);
        assert_eq!(
            p.windows.ranges,
            vec![(100_000, 100_000), (300_000, 50_000)]
        );
        // A 10% container fits in the rest of the second gap whole.
        let q = b.place("g_c", "GPU-a", 10);
        assert_eq!(q.windows.ranges, vec![(350_000, 50_000)]);
        assert_eq!(
            vgpu_contract::limits::parse_core_windows(&p.windows.render()).unwrap(),
            p.windows,
            "what the agent writes, the shim reads"
        );
    }

    #[test]
    fn placing_again_gives_the_same_windows() {
        let b = WindowBook::new(500);
        b.place("x_c", "GPU-a", 10);
        let first = b.place("y_c", "GPU-a", 30);
        assert_eq!(b.place("y_c", "GPU-a", 30), first);
        assert_eq!(b.owners(), vec!["x_c".to_string(), "y_c".to_string()]);
    }

    #[test]
    fn no_more_than_eight_pieces_and_an_overbooked_card_lands_where_it_is_thinnest() {
        // Ten 1%-wide gaps around nine holders: a 9% container cannot be made of 8 pieces.
        let taken: Vec<Range> = (0..9).map(|i| (i * 55_000 + 5_000, 50_000)).collect();
        let (r, fits) = allocate(P, &taken, 45_000);
        assert!(!fits && r.len() == 1, "{r:?}");
        // Half the period held twice, the other half once: the range goes into the once-held half.
        let taken = vec![(0, 250_000), (0, 250_000), (250_000, 250_000)];
        let (r, fits) = allocate(P, &taken, 100_000);
        assert!(!fits);
        assert!(r[0].0 >= 250_000, "{r:?}");
        // Room in pieces: taken from the largest gaps first.
        let taken = vec![(0, 100_000), (110_000, 100_000), (300_000, 100_000)];
        let (r, fits) = allocate(P, &taken, 150_000);
        assert!(fits);
        assert_eq!(r, vec![(210_000, 50_000), (400_000, 100_000)]);
    }

    #[test]
    fn windows_are_taken_back_from_the_limits_files_after_a_restart() {
        let root = std::env::temp_dir().join(format!("vgpu-windows-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let b = WindowBook::new(500);
        let devs = [dev("GPU-a", 30), dev("GPU-b", 0)];
        let a_lines = b.lines("uid1_app", &devs);
        assert_eq!(
            a_lines,
            vec![("VGPU_CORE_WINDOWS_0".into(), "500:0+150000".into())],
            "no windows on a device without a share"
        );
        let b_lines = b.lines("uid2_app", &[dev("GPU-a", 40)]);
        for (owner, visible, lines, state) in [
            ("uid1_app", "GPU-a,GPU-b", &a_lines, cd::LimitsState::Ready),
            ("uid2_app", "GPU-a", &b_lines, cd::LimitsState::Ready),
            // Revoked: nothing to take back.
            (
                "uid3_app",
                "GPU-a",
                &b_lines,
                cd::LimitsState::Revoked("x".into()),
            ),
        ] {
            let d = root.join(owner);
            std::fs::create_dir_all(&d).unwrap();
            let mut values = vec![(env::NVIDIA_VISIBLE_DEVICES, visible.to_string())];
            values.extend(lines.iter().map(|(k, v)| (k.as_str(), v.clone())));
            std::fs::write(d.join(cd::LIMITS_NAME), cd::render_limits(&values, &state)).unwrap();
        }
        let again = WindowBook::new(500);
        assert_eq!(again.recover_dir(&root), 2);
        assert_eq!(
            again.owners(),
            vec!["uid1_app".to_string(), "uid2_app".to_string()]
        );
        assert_eq!(again.lines("uid1_app", &devs), a_lines, "the same windows");
        assert_eq!(again.lines("uid2_app", &[dev("GPU-a", 40)]), b_lines);
        // A newcomer goes after them, not over them.
        assert_eq!(
            again.place("uid4_app", "GPU-a", 30).windows.ranges,
            vec![(350_000, 150_000)]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn only_owners_past_the_grace_and_not_kept_are_freed() {
        let b = WindowBook::new(500);
        b.place("live_c", "GPU-a", 30);
        b.place("gone_c", "GPU-a", 30);
        let now = Instant::now();
        assert!(
            b.retain(now, |o| o == "live_c").is_empty(),
            "within the grace"
        );
        let later = now + GRACE;
        assert_eq!(
            b.retain(later, |o| o == "live_c"),
            vec!["gone_c".to_string()]
        );
        assert_eq!(b.owners(), vec!["live_c".to_string()]);
        assert_eq!(
            b.place("new_c", "GPU-a", 70).windows.ranges,
            vec![(150_000, 350_000)]
        );
    }
}
