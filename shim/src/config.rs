//! What this process is allowed: its limits, from the mounted limits file (the root of trust, see
//! [`vgpu_contract::container_dir`]) and the environment (which may only tighten it), and what to do with bad
//! input.
//!
//! | input | behaviour |
//! |---|---|
//! | no limits file, no limit variables | no memory cap on any device |
//! | no limits file | the environment is the whole contract (HAMi's behaviour off Kubernetes) |
//! | `/usr/local/vgpu/limits` exists | it is the file; `VGPU_LIMITS_FILE` is ignored |
//! | file ready | its values are the ceiling: memory and SM share only lowered by the environment, the policy only tightened (disable < default < force), the period only shortened; cache file and card directory are the file's; `CUDA_DISABLE_CONTROL` is ignored |
//! | file ready with `VGPU_CORE_WINDOWS_<i>` | that device paces in exactly the agent's windows and their period (the environment can neither give, move nor lengthen windows; a lower share keeps their first part); a windows value that does not parse is a damaged file |
//! | file pending (empty, no state line) | wait up to the pending wait, then refuse every allocation, with a message |
//! | file revoked | refuse every allocation, context and launch, with the agent's reason |
//! | file unreadable, damaged, or a value in it unparsable | every allocation is refused, with a message (fail closed) |
//! | memory limit variable unparsable (no file) | every allocation on the devices it names is refused, with a message |
//! | `CUDA_DEVICE_SM_LIMIT` unparsable or above 100 (env) | message; no compute cap from that value |
//! | `GPU_CORE_UTILIZATION_POLICY` unknown (env) | message; `default` (with a file: the file's) |
//! | `CUDA_DISABLE_CONTROL=true` and no limits file | the shim passes every call through |

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vgpu_contract::cache_layout::MAX_DEVICES;
use vgpu_contract::container_dir::{self, LimitsState};
use vgpu_contract::env;
use vgpu_contract::limits::{
    parse_core_windows, parse_limits_file, parse_memory, parse_pacing_period, parse_sm_limit,
    CorePolicy, CoreWindows,
};

/// A memory ceiling for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemLimit {
    None,
    Bytes(u64),
    /// Input was bad: refuse every allocation rather than run uncapped.
    Refuse,
}

impl MemLimit {
    /// The tighter of two ceilings.
    fn min(self, other: MemLimit) -> MemLimit {
        use MemLimit::*;
        match (self, other) {
            (Refuse, _) | (_, Refuse) => Refuse,
            (None, x) | (x, None) => x,
            (Bytes(a), Bytes(b)) => Bytes(a.min(b)),
        }
    }

    pub fn bytes(self) -> Option<u64> {
        match self {
            MemLimit::Bytes(b) => Some(b),
            MemLimit::Refuse => Some(0),
            MemLimit::None => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub memory: [MemLimit; MAX_DEVICES],
    pub sm_limit: Option<u32>,
    pub policy: CorePolicy,
    /// True when the shim should pass everything through (HAMi's CUDA_DISABLE_CONTROL off Kubernetes).
    pub disabled: bool,
    pub cache_path: Option<PathBuf>,
    pub card_dir: PathBuf,
    /// The pacing period this process proposes for its cards (a card keeps the first one recorded).
    pub pacing_period_ns: u64,
    /// The compute windows the agent placed for each CUDA ordinal of the limits file (`VGPU_CORE_WINDOWS_<i>`;
    /// never from the environment). A device with windows paces inside exactly them, whatever the card says.
    pub core_windows: Vec<Option<CoreWindows>>,
    /// The limits file's `NVIDIA_VISIBLE_DEVICES` (GPU UUIDs in ordinal order), so a device's windows are found
    /// by its UUID even if the program renumbered its devices (`CUDA_VISIBLE_DEVICES`).
    pub window_uuids: Vec<String>,
    /// Why allocations are refused wholesale, if they are.
    pub refuse_reason: Option<String>,
    /// Set when the agent revoked the container's slice: contexts and launches are refused too.
    pub revoked: Option<String>,
}

/// The limits file as this process found it.
#[derive(Debug, Clone, PartialEq)]
pub enum LimitsFile {
    Absent,
    /// Present but not readable (`path: error`).
    Unreadable {
        path: PathBuf,
        error: String,
    },
    /// Its text; `waited` is how long the process waited for it to leave the pending state.
    Text {
        path: PathBuf,
        text: String,
        waited: Duration,
    },
}

/// The compute policies ordered from laxest to strictest: a tenant may move only towards force.
fn strictness(p: CorePolicy) -> u8 {
    match p {
        CorePolicy::Disable => 0,
        CorePolicy::Default => 1,
        CorePolicy::Force => 2,
    }
}

/// Applies one memory-limit key to `memory` (min with what is there). Keys that are not memory limits are
/// left alone. Returns false when the value was unparsable (and the devices it names are now refused).
fn apply_memory(
    name: &str,
    value: &str,
    source: &str,
    memory: &mut [MemLimit; MAX_DEVICES],
    msgs: &mut Vec<String>,
) -> bool {
    let devices: Vec<usize> = if name == env::MEMORY_LIMIT_ALL {
        (0..MAX_DEVICES).collect()
    } else if let Some(i) = name.strip_prefix(env::MEMORY_LIMIT_PREFIX) {
        match i.parse::<usize>() {
            Ok(i) if i < MAX_DEVICES => vec![i],
            _ => {
                msgs.push(format!(
                    "{source}: {name} names no device ordinal below {MAX_DEVICES}; ignored"
                ));
                return true;
            }
        }
    } else {
        return true;
    };
    let (limit, ok) = match parse_memory(value) {
        Ok(Some(b)) => (MemLimit::Bytes(b), true),
        Ok(None) => (MemLimit::None, true),
        Err(e) => {
            msgs.push(format!(
                "{source}: {name}: {e}; allocations on these devices are refused until it is fixed"
            ));
            (MemLimit::Refuse, false)
        }
    };
    for d in devices {
        memory[d] = memory[d].min(limit);
    }
    ok
}

/// Memory limits from `NAME=value` pairs: a per-device value wins over the all-devices one for its device.
fn memory_from(
    pairs: &[(String, String)],
    source: &str,
    msgs: &mut Vec<String>,
) -> ([MemLimit; MAX_DEVICES], bool) {
    let mut all = [MemLimit::None; MAX_DEVICES];
    let mut ok = true;
    for (k, v) in pairs.iter().filter(|(k, _)| k == env::MEMORY_LIMIT_ALL) {
        ok &= apply_memory(k, v, source, &mut all, msgs);
    }
    let mut own: [Option<MemLimit>; MAX_DEVICES] = [None; MAX_DEVICES];
    for (k, v) in pairs
        .iter()
        .filter(|(k, _)| k.starts_with(env::MEMORY_LIMIT_PREFIX))
    {
        let mut one = [MemLimit::None; MAX_DEVICES];
        ok &= apply_memory(k, v, source, &mut one, msgs);
        if let Some(d) = k
            .strip_prefix(env::MEMORY_LIMIT_PREFIX)
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|d| *d < MAX_DEVICES)
        {
            own[d] = Some(own[d].map_or(one[d], |o| o.min(one[d])));
        }
    }
    let mut memory = all;
    for d in 0..MAX_DEVICES {
        if let Some(o) = own[d] {
            memory[d] = o;
        }
    }
    (memory, ok)
}

/// What a ready limits file sets; None for what it leaves to the defaults.
#[derive(Default)]
struct FileValues {
    memory: Option<[MemLimit; MAX_DEVICES]>,
    sm_limit: Option<Option<u32>>,
    policy: Option<CorePolicy>,
    cache_path: Option<PathBuf>,
    card_dir: Option<PathBuf>,
    period_ns: Option<u64>,
    core_windows: Vec<Option<CoreWindows>>,
    visible: Vec<String>,
}

/// The values of a limits file, or why it is damaged. Every value it names must parse: the file is the
/// agent's, and a value it got wrong must not read as "no limit".
fn file_values(kv: &[(String, String)], msgs: &mut Vec<String>) -> Result<FileValues, String> {
    let mut out = FileValues::default();
    let mut mem_msgs = Vec::new();
    let (memory, ok) = memory_from(kv, "limits file", &mut mem_msgs);
    if !ok {
        return Err(mem_msgs.join("; "));
    }
    msgs.extend(mem_msgs);
    out.memory = Some(memory);
    let last = |key: &str| kv.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v);
    if let Some(v) = last(env::SM_LIMIT) {
        out.sm_limit = Some(parse_sm_limit(v).map_err(|e| format!("{}: {e}", env::SM_LIMIT))?);
    }
    if let Some(v) = last(env::CORE_POLICY) {
        out.policy = Some(CorePolicy::parse(v).map_err(|e| format!("{}: {e}", env::CORE_POLICY))?);
    }
    if let Some(v) = last(env::PACING_PERIOD_MS) {
        out.period_ns =
            Some(parse_pacing_period(v).map_err(|e| format!("{}: {e}", env::PACING_PERIOD_MS))?);
    }
    let path = |key: &str| -> Result<Option<PathBuf>, String> {
        match last(key) {
            None => Ok(None),
            Some(v) if Path::new(v).is_absolute() => Ok(Some(PathBuf::from(v))),
            Some(v) => Err(format!("{key}={v:?}: not an absolute path")),
        }
    };
    out.cache_path = path(env::SHARED_CACHE)?;
    out.card_dir = path(env::CARD_DIR)?;
    out.core_windows = vec![None; MAX_DEVICES];
    for (k, v) in kv {
        let Some(i) = k.strip_prefix(container_dir::CORE_WINDOWS_PREFIX) else {
            continue;
        };
        let dev = (i.len() <= 2 && i.bytes().all(|b| b.is_ascii_digit()))
            .then(|| i.parse::<usize>().ok())
            .flatten()
            .filter(|&d| d < MAX_DEVICES)
            .ok_or_else(|| format!("{k}: not a device ordinal below {MAX_DEVICES}"))?;
        let w = parse_core_windows(v).map_err(|e| format!("{k}: {e}"))?;
        // Two lines for one device are a damaged file: no reading of it may pick either.
        if out.core_windows[dev].replace(w).is_some() {
            return Err(format!("{k} appears more than once"));
        }
    }
    out.visible = last(env::NVIDIA_VISIBLE_DEVICES)
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(out)
}

/// Reads the limits from `get` (the environment) and `file`. Returns the config and the messages to print.
pub fn resolve(get: &dyn Fn(&str) -> Option<String>, file: LimitsFile) -> (Config, Vec<String>) {
    let mut msgs = Vec::new();
    let refuse_all = [MemLimit::Refuse; MAX_DEVICES];

    // What the file allows: None without a file (the environment is then the whole contract).
    let mut revoked = None;
    let mut refuse_reason = None;
    let file_path = match &file {
        LimitsFile::Absent => None,
        LimitsFile::Unreadable { path, .. } | LimitsFile::Text { path, .. } => Some(path.clone()),
    };
    let ceiling: Option<FileValues> = match file {
        LimitsFile::Absent => None,
        LimitsFile::Unreadable { path, error } => {
            refuse_reason = Some(format!(
                "limits file {} unreadable ({error}): every allocation is refused",
                path.display()
            ));
            Some(FileValues::default())
        }
        LimitsFile::Text { path, text, waited } => {
            let damaged = |why: String| {
                format!(
                    "limits file {} damaged ({why}): every allocation is refused; the node's vgpu-agent writes this file, check its log",
                    path.display()
                )
            };
            let parsed = parse_limits_file(&text)
                .map_err(|e| e.to_string())
                .and_then(|kv| Ok((container_dir::limits_state(&kv)?, kv)));
            match parsed {
                Err(e) => {
                    refuse_reason = Some(damaged(e));
                    Some(FileValues::default())
                }
                Ok((LimitsState::Pending, _)) => {
                    refuse_reason = Some(format!(
                        "limits file {} still pending after {} ms: the node's vgpu-agent has not confirmed which pod holds this container's GPUs, so every allocation is refused; check the agent's log and the pod's events, then restart the container",
                        path.display(),
                        waited.as_millis()
                    ));
                    Some(FileValues::default())
                }
                Ok((LimitsState::Revoked(reason), _)) => {
                    let why = format!(
                        "this container's GPU slice was revoked by the node's vgpu-agent ({}): every allocation and kernel launch is refused; see the pod's events",
                        if reason.is_empty() { "no reason given" } else { &reason }
                    );
                    refuse_reason = Some(why.clone());
                    revoked = Some(why);
                    Some(FileValues::default())
                }
                Ok((LimitsState::Ready, kv)) => match file_values(&kv, &mut msgs) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        refuse_reason = Some(damaged(e));
                        Some(FileValues::default())
                    }
                },
            }
        }
    };
    if let Some(r) = &refuse_reason {
        msgs.push(r.clone());
    }
    let has_file = ceiling.is_some();

    // The environment's values: with a file they may only tighten it.
    let env_pairs: Vec<(String, String)> = std::iter::once(env::MEMORY_LIMIT_ALL.to_string())
        .chain((0..MAX_DEVICES).map(|i| format!("{}{i}", env::MEMORY_LIMIT_PREFIX)))
        .filter_map(|k| get(&k).map(|v| (k, v)))
        .collect();
    let (env_mem, _) = memory_from(&env_pairs, "environment", &mut msgs);
    let env_sm = get(env::SM_LIMIT).and_then(|v| match parse_sm_limit(&v) {
        Ok(s) => s,
        Err(e) => {
            msgs.push(format!(
                "environment: {}: {e}; no compute cap from it",
                env::SM_LIMIT
            ));
            None
        }
    });
    let env_policy = get(env::CORE_POLICY).map(|v| {
        CorePolicy::parse(&v).unwrap_or_else(|e| {
            msgs.push(format!(
                "environment: {}: {e}; using {}",
                env::CORE_POLICY,
                if has_file {
                    "the limits file's"
                } else {
                    "default"
                }
            ));
            CorePolicy::Default
        })
    });
    let env_period = get(env::PACING_PERIOD_MS).and_then(|v| match parse_pacing_period(&v) {
        Ok(ns) => Some(ns),
        Err(e) => {
            msgs.push(format!(
                "environment: {}: {e}; using {} ms",
                env::PACING_PERIOD_MS,
                env::DEFAULT_PACING_PERIOD_MS
            ));
            None
        }
    });
    let disable_asked = get(env::DISABLE_CONTROL)
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
    let env_cache = get(env::SHARED_CACHE)
        .filter(|p| !p.trim().is_empty())
        .map(PathBuf::from);
    let env_card_dir = get(env::CARD_DIR).map(PathBuf::from);
    let default_period = env::DEFAULT_PACING_PERIOD_MS * 1_000_000;

    let cfg = match ceiling {
        None => Config {
            memory: env_mem,
            sm_limit: env_sm,
            policy: env_policy.unwrap_or_default(),
            disabled: disable_asked,
            cache_path: env_cache,
            card_dir: env_card_dir.unwrap_or_else(|| PathBuf::from(env::DEFAULT_CARD_DIR)),
            pacing_period_ns: env_period.unwrap_or(default_period),
            core_windows: vec![None; MAX_DEVICES],
            window_uuids: Vec::new(),
            refuse_reason: None,
            revoked: None,
        },
        Some(f) => {
            let file_path = file_path.expect("a ceiling comes from a file");
            let mut memory = if refuse_reason.is_some() {
                refuse_all
            } else {
                f.memory.unwrap_or([MemLimit::None; MAX_DEVICES])
            };
            for d in 0..MAX_DEVICES {
                memory[d] = memory[d].min(env_mem[d]);
            }
            let file_sm = f.sm_limit.flatten();
            let sm_limit = match (file_sm, env_sm) {
                (Some(f), Some(e)) => Some(f.min(e)),
                (f, e) => f.or(e),
            };
            let file_policy = f.policy.unwrap_or_default();
            let policy = match env_policy {
                Some(e) if strictness(e) > strictness(file_policy) => e,
                Some(e) if e != file_policy => {
                    msgs.push(format!(
                        "{}={} is ignored: this container's limits file sets {}, and the environment may only make it stricter",
                        env::CORE_POLICY,
                        e.as_str(),
                        file_policy.as_str()
                    ));
                    file_policy
                }
                _ => file_policy,
            };
            if disable_asked {
                msgs.push(format!(
                    "{} is ignored: this container's limits are set by its limits file",
                    env::DISABLE_CONTROL
                ));
            }
            // The container's one cache file: every process charges it whatever its environment says.
            let cache_path = f.cache_path.unwrap_or_else(|| {
                file_path
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .join(container_dir::CACHE_NAME)
            });
            if env_cache.as_ref().is_some_and(|e| *e != cache_path) {
                msgs.push(format!(
                    "{} is ignored: this container's cache file is {}, set by its limits file",
                    env::SHARED_CACHE,
                    cache_path.display()
                ));
            }
            let card_dir = f
                .card_dir
                .unwrap_or_else(|| PathBuf::from(env::DEFAULT_CARD_DIR));
            if env_card_dir.as_ref().is_some_and(|e| *e != card_dir) {
                msgs.push(format!(
                    "{} is ignored: the card directory is {}, set by the limits file",
                    env::CARD_DIR,
                    card_dir.display()
                ));
            }
            let file_period = f.period_ns.unwrap_or(default_period);
            let pacing_period_ns = env_period.map_or(file_period, |e| e.min(file_period));
            let core_windows = if refuse_reason.is_some() {
                vec![None; MAX_DEVICES]
            } else {
                f.core_windows
            };
            if let Some(w) = core_windows.iter().flatten().next() {
                if env_period.is_some_and(|e| e != w.period_ms * 1_000_000) {
                    msgs.push(format!(
                        "{} is ignored on devices the node's agent placed windows for ({} ms periods)",
                        env::PACING_PERIOD_MS,
                        w.period_ms
                    ));
                }
            }
            Config {
                memory,
                sm_limit,
                policy,
                disabled: false,
                cache_path: Some(cache_path),
                card_dir,
                pacing_period_ns,
                core_windows,
                window_uuids: f.visible,
                refuse_reason,
                revoked,
            }
        }
    };
    (cfg, msgs)
}

/// Which limits file applies: the default path whenever anything is there (a tenant cannot point elsewhere),
/// else `VGPU_LIMITS_FILE`. Returns the path, or None for no file, and a message when the variable was
/// ignored.
pub fn limits_file_path(default: &Path, named: Option<&str>) -> (Option<PathBuf>, Option<String>) {
    // Anything at the default path but a clean "not found" counts as present: an error reading it then
    // refuses every allocation rather than falling back to the environment.
    let default_there = !matches!(
        std::fs::symlink_metadata(default),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    );
    match named.filter(|n| !n.is_empty()) {
        _ if default_there => {
            let msg = named.filter(|n| Path::new(n) != default).map(|n| {
                format!(
                    "{}={n} is ignored: this container's limits file is {}",
                    env::LIMITS_FILE,
                    default.display()
                )
            });
            (Some(default.to_path_buf()), msg)
        }
        Some(n) => (Some(PathBuf::from(n)), None),
        None => (None, None),
    }
}

/// Reads the limits file at `path`, waiting up to `wait` (polling) while it is pending.
pub fn read_limits_file(path: &Path, wait: Duration) -> LimitsFile {
    let start = Instant::now();
    let mut first = true;
    loop {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            // Gone while we waited is not "absent": the file was there, so it still binds.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && first => {
                return LimitsFile::Absent
            }
            Err(e) => {
                return LimitsFile::Unreadable {
                    path: path.to_path_buf(),
                    error: e.to_string(),
                }
            }
        };
        let pending = parse_limits_file(&text)
            .ok()
            .and_then(|kv| container_dir::limits_state(&kv).ok())
            == Some(LimitsState::Pending);
        let waited = start.elapsed();
        if !pending || waited >= wait {
            return LimitsFile::Text {
                path: path.to_path_buf(),
                text,
                waited,
            };
        }
        first = false;
        std::thread::sleep(Duration::from_millis(50).min(wait - waited));
    }
}

/// How long to wait for a pending file: the contract's wait, or less if the environment asks.
fn pending_wait(get: &dyn Fn(&str) -> Option<String>) -> Duration {
    let most = container_dir::PENDING_WAIT_MS;
    let ms = get(env::LIMITS_PENDING_WAIT_MS)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(most, |v| v.min(most));
    Duration::from_millis(ms)
}

impl Config {
    /// The agent's windows for CUDA device `dev` whose UUID is `uuid`: found by the UUID in the limits file's
    /// device list when it is there, else by the ordinal. None: pace by the card file as before.
    pub fn windows_for(&self, dev: usize, uuid: Option<&str>) -> Option<&CoreWindows> {
        let i = uuid
            .and_then(|u| self.window_uuids.iter().position(|w| w == u))
            .unwrap_or(dev);
        self.core_windows.get(i).and_then(Option::as_ref)
    }
}

/// The config of this process, from its real environment and limits file.
pub fn from_process() -> (Config, Vec<String>) {
    let get = |k: &str| std::env::var(k).ok();
    let named = get(env::LIMITS_FILE);
    let (path, ignored) = limits_file_path(Path::new(env::DEFAULT_LIMITS_FILE), named.as_deref());
    let file = match path {
        None => LimitsFile::Absent,
        Some(p) => read_limits_file(&p, pending_wait(&get)),
    };
    let (cfg, mut msgs) = resolve(&get, file);
    msgs.extend(ignored);
    (cfg, msgs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const MIB: u64 = 1 << 20;

    /// `file`: None for no file, Some(Err) for an unreadable one, Some(Ok(text)) for its text (a state line
    /// `ready` is added unless the text has one: most tests are about a confirmed file).
    fn run(env: &[(&str, &str)], file: Option<Result<&str, &str>>) -> (Config, Vec<String>) {
        let file = match file {
            None => LimitsFile::Absent,
            Some(Err(e)) => LimitsFile::Unreadable {
                path: "/usr/local/vgpu/limits".into(),
                error: e.into(),
            },
            Some(Ok(t)) if t.contains("VGPU_LIMITS_STATE") => text(t),
            Some(Ok(t)) => text(&format!("{t}\nVGPU_LIMITS_STATE=ready\n")),
        };
        run_file(env, file)
    }

    fn text(t: &str) -> LimitsFile {
        LimitsFile::Text {
            path: "/usr/local/vgpu/limits".into(),
            text: t.into(),
            waited: Duration::from_millis(7),
        }
    }

    fn run_file(env: &[(&str, &str)], file: LimitsFile) -> (Config, Vec<String>) {
        let m: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(&|k| m.get(k).cloned(), file)
    }

    #[test]
    fn env_alone_is_the_contract() {
        let (c, m) = run(
            &[
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "4000m"),
                ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
            ],
            None,
        );
        assert!(m.is_empty(), "{m:?}");
        assert_eq!(c.memory[0], MemLimit::Bytes(4000 * MIB));
        assert_eq!(c.memory[1], MemLimit::Bytes(1024 * MIB));
        let (c, _) = run(&[], None);
        assert_eq!(c.memory[0], MemLimit::None);
    }

    #[test]
    fn file_is_a_ceiling_env_only_lowers() {
        let f = "CUDA_DEVICE_MEMORY_LIMIT_0=4000m\nCUDA_DEVICE_SM_LIMIT=30\n";
        let (c, _) = run(
            &[
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "80000m"),
                ("CUDA_DEVICE_SM_LIMIT", "100"),
            ],
            Some(Ok(f)),
        );
        assert_eq!(
            c.memory[0],
            MemLimit::Bytes(4000 * MIB),
            "env cannot raise the file's limit"
        );
        assert_eq!(
            c.sm_limit,
            Some(30),
            "100 (no cap) in env cannot lift the file's 30"
        );
        let (c, _) = run(
            &[
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "1000m"),
                ("CUDA_DEVICE_SM_LIMIT", "20"),
            ],
            Some(Ok(f)),
        );
        assert_eq!(c.memory[0], MemLimit::Bytes(1000 * MIB));
        assert_eq!(c.sm_limit, Some(20));
    }

    #[test]
    fn disable_control_only_off_kubernetes() {
        let (c, m) = run(
            &[("CUDA_DISABLE_CONTROL", "true")],
            Some(Ok("CUDA_DEVICE_MEMORY_LIMIT_0=4000m")),
        );
        assert!(!c.disabled);
        assert!(m.iter().any(|x| x.contains("ignored")));
        let (c, _) = run(
            &[
                ("CUDA_DISABLE_CONTROL", "true"),
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "4000m"),
            ],
            None,
        );
        assert!(c.disabled);
    }

    #[test]
    fn bad_input_fails_closed_for_memory() {
        let (c, m) = run(&[("CUDA_DEVICE_MEMORY_LIMIT_0", "4000mb")], None);
        assert_eq!(c.memory[0], MemLimit::Refuse);
        assert_eq!(c.memory[1], MemLimit::None);
        assert!(m[0].contains("4000mb"), "{m:?}");
        let (c, m) = run(&[], Some(Err("permission denied")));
        assert!(c.memory.iter().all(|l| *l == MemLimit::Refuse));
        assert!(c.refuse_reason.is_some() && m[0].contains("permission denied"));
        let (c, _) = run(&[], Some(Ok("CUDA_DEVICE_MEMORY_LIMIT_0")));
        assert!(c.refuse_reason.is_some());
        // Any unparsable value in the file refuses everything: the agent's mistake is not "no limit".
        for bad in [
            "CUDA_DEVICE_SM_LIMIT=150",
            "GPU_CORE_UTILIZATION_POLICY=lax",
            "VGPU_PACING_PERIOD_MS=1",
            "VGPU_CARD_DIR=relative/dir",
            "VGPU_LIMITS_STATE=maybe",
            "VGPU_CORE_WINDOWS_0=500:0+600000",
            "VGPU_CORE_WINDOWS_0=500:0+1000,0+1000",
            "VGPU_CORE_WINDOWS_16=500:0+1000",
            "VGPU_CORE_WINDOWS_x=500:0+1000",
            "VGPU_CORE_WINDOWS_0=500:0+1000\nVGPU_CORE_WINDOWS_0=500:1000+1000",
        ] {
            let (c, m) = run(&[], Some(Ok(bad)));
            assert!(c.memory.iter().all(|l| *l == MemLimit::Refuse), "{bad}");
            assert!(m[0].contains("damaged"), "{bad}: {m:?}");
        }
    }

    #[test]
    fn compute_windows_come_from_the_file_only() {
        let f = "NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b\nCUDA_DEVICE_SM_LIMIT=30\n\
                 VGPU_CORE_WINDOWS_0=500:0+150000\nVGPU_CORE_WINDOWS_1=500:100000+50000,300000+100000";
        let (c, m) = run(&[("VGPU_PACING_PERIOD_MS", "50")], Some(Ok(f)));
        let w0 = c.windows_for(0, Some("GPU-a")).unwrap();
        assert_eq!((w0.period_ms, w0.ranges.clone()), (500, vec![(0, 150_000)]));
        assert_eq!(
            c.windows_for(0, Some("GPU-b")).unwrap().ranges.len(),
            2,
            "found by UUID whatever the ordinal"
        );
        assert_eq!(c.windows_for(1, None).unwrap().ranges.len(), 2);
        assert!(c.windows_for(2, None).is_none());
        assert!(
            m.iter()
                .any(|x| x.contains("VGPU_PACING_PERIOD_MS is ignored")),
            "{m:?}"
        );
        // The environment can neither give nor move windows.
        let (c, _) = run(
            &[("VGPU_CORE_WINDOWS_0", "500:0+400000")],
            Some(Ok("CUDA_DEVICE_SM_LIMIT=30")),
        );
        assert!(c.windows_for(0, None).is_none());
        let (c, _) = run(&[("VGPU_CORE_WINDOWS_0", "500:0+400000")], None);
        assert!(c.windows_for(0, None).is_none());
    }

    #[test]
    fn policy_paths_and_period_come_from_the_file() {
        let f = "CUDA_DEVICE_SM_LIMIT=30\nGPU_CORE_UTILIZATION_POLICY=force\n\
                 CUDA_DEVICE_MEMORY_SHARED_CACHE=/usr/local/vgpu/vgpu.cache\n\
                 VGPU_CARD_DIR=/var/run/vgpu/cards\nVGPU_PACING_PERIOD_MS=200";
        let tenant = [
            ("GPU_CORE_UTILIZATION_POLICY", "disable"),
            ("CUDA_DEVICE_SM_LIMIT", "0"),
            ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/tmp/mine.cache"),
            ("VGPU_CARD_DIR", "/tmp/my-cards"),
            ("VGPU_PACING_PERIOD_MS", "5000"),
        ];
        let (c, m) = run(&tenant, Some(Ok(f)));
        assert_eq!(c.policy, CorePolicy::Force);
        assert_eq!(c.sm_limit, Some(30));
        assert_eq!(
            c.cache_path.as_deref(),
            Some(Path::new("/usr/local/vgpu/vgpu.cache"))
        );
        assert_eq!(c.card_dir, Path::new("/var/run/vgpu/cards"));
        assert_eq!(
            c.pacing_period_ns, 200_000_000,
            "a longer period is refused"
        );
        for name in [
            "GPU_CORE_UTILIZATION_POLICY=disable is ignored",
            "CUDA_DEVICE_MEMORY_SHARED_CACHE is ignored",
            "VGPU_CARD_DIR is ignored",
        ] {
            assert!(m.iter().any(|x| x.contains(name)), "{name}: {m:?}");
        }
        // Stricter is allowed: default to force, a shorter period.
        let (c, _) = run(
            &[
                ("GPU_CORE_UTILIZATION_POLICY", "force"),
                ("VGPU_PACING_PERIOD_MS", "50"),
            ],
            Some(Ok("CUDA_DEVICE_SM_LIMIT=30")),
        );
        assert_eq!(c.policy, CorePolicy::Force);
        assert_eq!(c.pacing_period_ns, 50_000_000);
        // Default went to disable: refused.
        let (c, _) = run(
            &[("GPU_CORE_UTILIZATION_POLICY", "disable")],
            Some(Ok("CUDA_DEVICE_SM_LIMIT=30")),
        );
        assert_eq!(c.policy, CorePolicy::Default);
        // No cache line: the file's sibling, whatever the environment names.
        let (c, _) = run(
            &[("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/tmp/x.cache")],
            Some(Ok("CUDA_DEVICE_MEMORY_LIMIT=1g")),
        );
        assert_eq!(
            c.cache_path.as_deref(),
            Some(Path::new("/usr/local/vgpu/vgpu.cache"))
        );
        assert_eq!(c.card_dir, Path::new(env::DEFAULT_CARD_DIR));
    }

    #[test]
    fn pending_and_revoked_files_refuse() {
        let (c, m) = run_file(
            &[("CUDA_DEVICE_MEMORY_LIMIT_0", "4000m")],
            text("CUDA_DEVICE_MEMORY_LIMIT_0=4000m\n"),
        );
        assert!(c.memory.iter().all(|l| *l == MemLimit::Refuse));
        assert!(c.revoked.is_none());
        assert!(m[0].contains("still pending after 7 ms"), "{m:?}");
        let (c, m) = run_file(&[], text(""));
        assert!(c.refuse_reason.is_some() && m[0].contains("pending"));
        let (c, m) = run_file(
            &[("CUDA_DISABLE_CONTROL", "1")],
            text("CUDA_DEVICE_MEMORY_LIMIT_0=4000m\nVGPU_LIMITS_REASON=pod x holds GPU-1\nVGPU_LIMITS_STATE=revoked\n"),
        );
        assert!(c.memory.iter().all(|l| *l == MemLimit::Refuse) && !c.disabled);
        assert!(
            c.revoked
                .as_deref()
                .is_some_and(|r| r.contains("pod x holds GPU-1")),
            "{c:?}"
        );
        assert!(m[0].contains("revoked"), "{m:?}");
    }

    #[test]
    fn the_default_file_wins_over_the_variable() {
        let dir = std::env::temp_dir().join(format!("vgpu-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let default = dir.join("limits");
        let other = dir.join("other");
        let (p, m) = limits_file_path(&default, Some(other.to_str().unwrap()));
        assert_eq!(
            (p, m),
            (Some(other.clone()), None),
            "no default: the variable names it"
        );
        assert_eq!(limits_file_path(&default, None), (None, None));
        std::fs::write(&default, "").unwrap();
        let (p, m) = limits_file_path(&default, Some("/nonexistent"));
        assert_eq!(p, Some(default.clone()));
        assert!(m
            .unwrap()
            .contains("VGPU_LIMITS_FILE=/nonexistent is ignored"));
        std::fs::remove_file(&default).unwrap();
        // Anything in its place counts (a directory here): reading it then fails closed.
        std::fs::create_dir(&default).unwrap();
        assert_eq!(limits_file_path(&default, None).0, Some(default.clone()));
        assert!(matches!(
            read_limits_file(&default, Duration::ZERO),
            LimitsFile::Unreadable { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pending_file_is_waited_for() {
        let dir = std::env::temp_dir().join(format!("vgpu-pending-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("limits");
        std::fs::write(&f, "").unwrap();
        let t = Instant::now();
        let got = read_limits_file(&f, Duration::from_millis(120));
        assert!(t.elapsed() >= Duration::from_millis(120));
        assert!(
            matches!(got, LimitsFile::Text { waited, .. } if waited >= Duration::from_millis(120))
        );
        let f2 = f.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(
                &f2,
                "CUDA_DEVICE_MEMORY_LIMIT_0=1g\nVGPU_LIMITS_STATE=ready\n",
            )
            .unwrap();
        });
        let got = read_limits_file(&f, Duration::from_secs(20));
        writer.join().unwrap();
        let LimitsFile::Text { text, waited, .. } = got else {
            panic!("{got:?}")
        };
        assert!(text.contains("ready") && waited < Duration::from_secs(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_compute_input_is_reported_and_uncapped() {
        for v in ["abc", "150", "-1"] {
            let (c, m) = run(&[("CUDA_DEVICE_SM_LIMIT", v)], None);
            assert_eq!(c.sm_limit, None);
            assert_eq!(m.len(), 1, "{v}: {m:?}");
        }
        let (c, m) = run(&[("CUDA_DEVICE_SM_LIMIT", "0")], None);
        assert_eq!((c.sm_limit, m.len()), (None, 0));
        let (c, m) = run(&[("GPU_CORE_UTILIZATION_POLICY", "strict")], None);
        assert_eq!(c.policy, CorePolicy::Default);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn pacing_period_from_the_environment_or_the_default() {
        let (c, m) = run(&[("VGPU_PACING_PERIOD_MS", "50")], None);
        assert_eq!((c.pacing_period_ns, m.len()), (50_000_000, 0));
        let (c, m) = run(&[("VGPU_PACING_PERIOD_MS", "2ms")], None);
        assert_eq!(c.pacing_period_ns, 500_000_000);
        assert!(
            m[0].contains("VGPU_PACING_PERIOD_MS") && m[0].contains("500 ms"),
            "{m:?}"
        );
    }
}
