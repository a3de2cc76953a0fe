//! How much memory the machine can give: `MemAvailable` from `/proc/meminfo`, lowered by the
//! cgroup (v2 or v1) limit of the container the process runs in. The engine sizes its default KV
//! cache from it (see [`KV_MEMORY_SHARE`]), after the weights are loaded, so they are counted.

use std::path::Path;

/// The share of the available memory (measured after the weights are loaded) the default host KV
/// cache may take: the rest is left for activations, requests, the tokenizer and the system.
pub const KV_MEMORY_SHARE: f64 = 0.5;

/// Bytes this process can still allocate without swapping or being killed, if the system says:
/// `MemAvailable`, or less when a cgroup memory limit leaves less room. `None` off Linux.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let avail = meminfo.as_deref().and_then(meminfo_available);
    let cgroup = cgroup_room(Path::new("/sys/fs/cgroup"));
    match (avail, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// `MemAvailable` (kB) of a `/proc/meminfo` text, in bytes.
pub fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Room left under the cgroup limit below `root` (v2: `memory.max` − `memory.current`; v1:
/// `memory/memory.limit_in_bytes` − `memory/memory.usage_in_bytes`); `None` without a limit.
pub fn cgroup_room(root: &Path) -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let (limit, used) = match read("memory.max") {
        Some(l) => (l, read("memory.current")?),
        None => (read("memory/memory.limit_in_bytes")?, read("memory/memory.usage_in_bytes")?),
    };
    // cgroup v1 writes "no limit" as a huge number (about 2^63).
    (limit < 1 << 60).then(|| limit.saturating_sub(used))
}

/// `bytes` as `1.52 GiB` / `300 MiB`.
pub fn human(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo_and_cgroups() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available(text), Some(20_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 5 kB\n"), None);
        let dir = std::env::temp_dir().join(format!("infer-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("memory")).unwrap();
        assert_eq!(cgroup_room(&dir), None);
        std::fs::write(dir.join("memory/memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        std::fs::write(dir.join("memory/memory.usage_in_bytes"), "1000\n").unwrap();
        assert_eq!(cgroup_room(&dir), None, "v1 without a limit");
        std::fs::write(dir.join("memory.max"), "4000\n").unwrap();
        std::fs::write(dir.join("memory.current"), "1000\n").unwrap();
        assert_eq!(cgroup_room(&dir), Some(3000));
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_room(&dir), None, "v2 unlimited falls back to the v1 files: unlimited too");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(available_bytes().is_some(), "Linux has /proc/meminfo");
    }
}
