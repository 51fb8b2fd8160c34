//! What `/proc` says about a process: its name, its container, its children.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
};

/// Name (comm) of a process, as the kernel reports it (at most 15 bytes).
pub fn comm(pid: u32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_owned())
}

pub fn exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// True while `pid` runs: it exists and is not a zombie waiting to be
/// reaped (a process that exited but whose parent has not waited yet).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// When `pid` started (field 22 of `/proc/<pid>/stat`, in clock ticks
/// since boot): with the pid, what tells a process from a later one that
/// reuses its pid.
pub fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// `comm` bytes from a kernel record, up to the first NUL.
pub fn comm_from_bytes(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    (end > 0).then(|| String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// Container id of a process from its cgroup path (Docker, containerd,
/// CRI-O, Podman all end the path with a 64-hex-digit id, possibly wrapped as
/// `docker-<id>.scope` or `cri-containerd-<id>.scope`). Empty outside one.
pub fn container_id(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| container_id_from_cgroup(&text))
        .unwrap_or_default()
}

pub fn container_id_from_cgroup(text: &str) -> Option<String> {
    for line in text.lines() {
        let path = line.splitn(3, ':').nth(2)?;
        for segment in path.rsplit('/') {
            let segment = segment.strip_suffix(".scope").unwrap_or(segment);
            let id = segment.rsplit(['-', ':']).next().unwrap_or(segment);
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(id[..12].to_owned());
            }
        }
    }
    None
}

/// Every process id currently in `/proc`, with its parent.
pub fn parent_map() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return map;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(ppid) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_ppid(&s))
        {
            map.insert(pid, ppid);
        }
    }
    map
}

/// Field 4 of `/proc/<pid>/stat`, after the parenthesised comm (which may
/// itself contain spaces and parentheses).
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// `roots` and all their descendants.
pub fn with_descendants(roots: &[u32], parents: &HashMap<u32, u32>) -> HashSet<u32> {
    let mut set: HashSet<u32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (pid, ppid) in parents {
            if set.contains(ppid) {
                set.insert(*pid);
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

/// Processes whose comm is one of `names`.
pub fn by_comm(names: &[String]) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| comm(*pid).is_some_and(|c| names.contains(&c)))
        .collect()
}

/// Resolves process labels: the comm the kernel recorded with the event
/// when there is one (exact even for a process that has exited since),
/// `/proc` otherwise; the container once per tgid.
#[derive(Default)]
pub struct ProcessNames {
    cache: HashMap<u32, (String, String)>,
}

impl ProcessNames {
    /// `(process, container)` for `tgid`.
    pub fn labels(&mut self, tgid: u32, kernel_comm: &[u8]) -> (String, String) {
        if self.cache.len() > 65_536 {
            self.cache.clear();
        }
        let (proc_comm, container) = self
            .cache
            .entry(tgid)
            .or_insert_with(|| {
                (
                    comm(tgid).unwrap_or_else(|| "unknown".to_owned()),
                    container_id(tgid),
                )
            })
            .clone();
        let name = comm_from_bytes(kernel_comm).unwrap_or(proc_comm);
        (name, container)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_whatever_the_comm() {
        let stat =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("4242 (x) S 1"), None);
        let me = std::process::id();
        assert!(start_time(me).is_some_and(|t| t > 0));
    }

    #[test]
    fn ppid_survives_odd_comms() {
        assert_eq!(parse_ppid("42 (a b) c) S 7 42 42 0"), Some(7));
        assert_eq!(parse_ppid("1 (systemd) S 0 1 1"), Some(0));
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn descendants_are_followed_transitively() {
        let parents = HashMap::from([(2, 1), (3, 2), (4, 3), (5, 99)]);
        let set = with_descendants(&[2], &parents);
        assert_eq!(set, HashSet::from([2, 3, 4]));
    }

    #[test]
    fn container_ids_from_common_runtimes() {
        let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00998877665544332211";
        let docker = format!("0::/system.slice/docker-{id}.scope\n");
        assert_eq!(
            container_id_from_cgroup(&docker).as_deref(),
            Some(&id[..12])
        );
        let k8s = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{id}.scope\n"
        );
        assert_eq!(container_id_from_cgroup(&k8s).as_deref(), Some(&id[..12]));
        let plain = format!("12:pids:/docker/{id}\n");
        assert_eq!(container_id_from_cgroup(&plain).as_deref(), Some(&id[..12]));
        assert_eq!(
            container_id_from_cgroup("0::/user.slice/session-1.scope\n"),
            None
        );
    }

    #[test]
    fn comm_stops_at_nul() {
        assert_eq!(comm_from_bytes(b"curl\0\0\0").as_deref(), Some("curl"));
        assert_eq!(comm_from_bytes(b"\0abc"), None);
    }
}
