//! What this process is allowed: its limits, from the mounted limits file (a ceiling the container cannot
//! lift) and the environment (which may only lower it), and what to do with bad input.
//!
//! | input | behaviour |
//! |---|---|
//! | no limits file, no limit variables | no memory cap on any device |
//! | limits file present | its values are the ceiling; env values only lower them; `CUDA_DISABLE_CONTROL` is ignored |
//! | limits file present but unreadable, or a value in it unparsable | every allocation is refused, with a message (fail closed) |
//! | memory limit variable unparsable (no file) | every allocation on the devices it names is refused, with a message |
//! | `CUDA_DEVICE_SM_LIMIT` unparsable or above 100 | message; no compute cap from that value |
//! | `GPU_CORE_UTILIZATION_POLICY` unknown | message; `default` |
//! | `CUDA_DISABLE_CONTROL=true` and no limits file | the shim passes every call through (HAMi's behaviour off Kubernetes) |

use std::path::PathBuf;
use vgpu_contract::cache_layout::MAX_DEVICES;
use vgpu_contract::env;
use vgpu_contract::limits::{
    parse_limits_file, parse_memory, parse_pacing_period, parse_sm_limit, CorePolicy,
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
    /// Why allocations are refused wholesale, if they are.
    pub refuse_reason: Option<String>,
}

/// Reads the limits from `get` (the environment) and `file` (the limits file: None when absent, Some(Err)
/// when present but unreadable). Returns the config and the messages to print.
pub fn resolve(
    get: &dyn Fn(&str) -> Option<String>,
    file: Option<Result<String, String>>,
) -> (Config, Vec<String>) {
    let mut msgs = Vec::new();
    let mut memory = [MemLimit::None; MAX_DEVICES];
    let mut refuse_reason = None;
    let has_file = file.is_some();

    let apply = |name: &str,
                 value: &str,
                 source: &str,
                 memory: &mut [MemLimit; MAX_DEVICES],
                 msgs: &mut Vec<String>|
     -> Result<(), String> {
        let devices: Vec<usize> = if name == env::MEMORY_LIMIT_ALL {
            (0..MAX_DEVICES).collect()
        } else if let Some(i) = name.strip_prefix(env::MEMORY_LIMIT_PREFIX) {
            match i.parse::<usize>() {
                Ok(i) if i < MAX_DEVICES => vec![i],
                _ => {
                    msgs.push(format!(
                        "{source}: {name} names no device ordinal below {MAX_DEVICES}; ignored"
                    ));
                    return Ok(());
                }
            }
        } else {
            return Ok(());
        };
        let limit = match parse_memory(value) {
            Ok(Some(b)) => MemLimit::Bytes(b),
            Ok(None) => MemLimit::None,
            Err(e) => {
                msgs.push(format!("{source}: {name}: {e}; allocations on these devices are refused until it is fixed"));
                MemLimit::Refuse
            }
        };
        for d in devices {
            memory[d] = memory[d].min(limit);
        }
        Ok(())
    };

    let mut file_sm: Option<Option<u32>> = None;
    match file {
        None => {}
        Some(Err(e)) => {
            let why = format!("limits file unreadable ({e}): every allocation is refused");
            msgs.push(why.clone());
            memory = [MemLimit::Refuse; MAX_DEVICES];
            refuse_reason = Some(why);
        }
        Some(Ok(text)) => match parse_limits_file(&text) {
            Err(e) => {
                let why = format!("limits file damaged ({e}): every allocation is refused");
                msgs.push(why.clone());
                memory = [MemLimit::Refuse; MAX_DEVICES];
                refuse_reason = Some(why);
            }
            Ok(kv) => {
                // Per-device values first, the all-devices value as a fallback for ordinals without one.
                let mut per_dev = [false; MAX_DEVICES];
                for (k, v) in &kv {
                    if let Some(i) = k
                        .strip_prefix(env::MEMORY_LIMIT_PREFIX)
                        .and_then(|i| i.parse::<usize>().ok())
                    {
                        if i < MAX_DEVICES {
                            per_dev[i] = true;
                        }
                    }
                    if k == env::SM_LIMIT {
                        match parse_sm_limit(v) {
                            Ok(s) => file_sm = Some(s),
                            Err(e) => msgs.push(format!(
                                "limits file: {}: {e}; no compute cap from it",
                                env::SM_LIMIT
                            )),
                        }
                    }
                }
                for (k, v) in &kv {
                    if k == env::MEMORY_LIMIT_ALL {
                        let _ = apply(k, v, "limits file", &mut memory, &mut msgs);
                        for (d, has) in per_dev.iter().enumerate() {
                            if *has {
                                memory[d] = MemLimit::None;
                            }
                        }
                    }
                }
                for (k, v) in &kv {
                    if k.starts_with(env::MEMORY_LIMIT_PREFIX) {
                        let _ = apply(k, v, "limits file", &mut memory, &mut msgs);
                    }
                }
                if memory.contains(&MemLimit::Refuse) {
                    refuse_reason = Some("limits file has an unparsable memory limit".into());
                }
            }
        },
    }

    // The environment: with a file it may only lower (min); without one it is the whole contract.
    let mut env_mem = [MemLimit::None; MAX_DEVICES];
    if let Some(v) = get(env::MEMORY_LIMIT_ALL) {
        let _ = apply(
            env::MEMORY_LIMIT_ALL,
            &v,
            "environment",
            &mut env_mem,
            &mut msgs,
        );
    }
    for i in 0..MAX_DEVICES {
        let name = format!("{}{i}", env::MEMORY_LIMIT_PREFIX);
        if let Some(v) = get(&name) {
            // A per-device value replaces the all-devices one for that device.
            let mut one = [MemLimit::None; MAX_DEVICES];
            let _ = apply(&name, &v, "environment", &mut one, &mut msgs);
            env_mem[i] = one[i];
        }
    }
    for d in 0..MAX_DEVICES {
        memory[d] = memory[d].min(env_mem[d]);
    }

    let env_sm = match get(env::SM_LIMIT) {
        None => None,
        Some(v) => match parse_sm_limit(&v) {
            Ok(s) => Some(s),
            Err(e) => {
                msgs.push(format!(
                    "environment: {}: {e}; no compute cap from it",
                    env::SM_LIMIT
                ));
                None
            }
        },
    };
    // The file's value is a ceiling; the environment may add or lower a cap, never lift one.
    let env_sm = env_sm.flatten();
    let sm_limit = match file_sm.flatten() {
        Some(f) => Some(env_sm.map_or(f, |e| e.min(f))),
        None => env_sm,
    };

    let policy = match get(env::CORE_POLICY) {
        None => CorePolicy::Default,
        Some(v) => CorePolicy::parse(&v).unwrap_or_else(|e| {
            msgs.push(format!(
                "environment: {}: {e}; using default",
                env::CORE_POLICY
            ));
            CorePolicy::Default
        }),
    };

    let disable_asked = get(env::DISABLE_CONTROL)
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
    let disabled = disable_asked && !has_file;
    if disable_asked && has_file {
        msgs.push(format!(
            "{} is ignored: this container's limits are set by its limits file",
            env::DISABLE_CONTROL
        ));
    }

    let cache_path = get(env::SHARED_CACHE)
        .filter(|p| !p.trim().is_empty())
        .map(PathBuf::from);
    let card_dir = get(env::CARD_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::DEFAULT_CARD_DIR));
    let default_period = env::DEFAULT_PACING_PERIOD_MS * 1_000_000;
    let pacing_period_ns = match get(env::PACING_PERIOD_MS) {
        None => default_period,
        Some(v) => parse_pacing_period(&v).unwrap_or_else(|e| {
            msgs.push(format!(
                "environment: {}: {e}; using {} ms",
                env::PACING_PERIOD_MS,
                env::DEFAULT_PACING_PERIOD_MS
            ));
            default_period
        }),
    };
    let cfg = Config {
        memory,
        sm_limit,
        policy,
        disabled,
        cache_path,
        card_dir,
        pacing_period_ns,
        refuse_reason,
    };
    (cfg, msgs)
}

/// The config of this process, from its real environment and limits file.
pub fn from_process() -> (Config, Vec<String>) {
    let file_path =
        std::env::var(env::LIMITS_FILE).unwrap_or_else(|_| env::DEFAULT_LIMITS_FILE.to_string());
    let file = match std::fs::read_to_string(&file_path) {
        Ok(t) => Some(Ok(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(format!("{file_path}: {e}"))),
    };
    resolve(&|k| std::env::var(k).ok(), file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const MIB: u64 = 1 << 20;

    fn run(env: &[(&str, &str)], file: Option<Result<&str, &str>>) -> (Config, Vec<String>) {
        let m: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(
            &|k| m.get(k).cloned(),
            file.map(|r| r.map(str::to_string).map_err(str::to_string)),
        )
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
