//! Checking, before anything is attempted, that the agent has the
//! capabilities it needs, so that a missing one is named instead of
//! surfacing as an EPERM from deep inside a load.
//!
//! Least privilege: from Linux 5.8 on, loading and attaching take
//! `CAP_BPF` and `CAP_PERFMON` only (the kernel's `bpf_capable()` and
//! `perfmon_capable()` accept `CAP_SYS_ADMIN` in their place). Reading other
//! processes' `/proc/<pid>/{maps,exe,root}` takes `CAP_SYS_PTRACE`, and
//! reading root-only files (tracefs formats, `/proc` of other users) as a
//! non-root user takes `CAP_DAC_READ_SEARCH`. Before 5.8 only
//! `CAP_SYS_ADMIN` will do, and uprobes (allocator profiling) need it on
//! every current kernel.
//!
//! Before 5.11 the kernel charges BPF maps to `RLIMIT_MEMLOCK` (64 KiB by
//! default before 5.16) rather than to the memory cgroup: there the limit
//! is raised at start, which past its hard limit takes
//! `CAP_SYS_RESOURCE`; without it, the error says so.

use thiserror::Error;

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

const CAP_SYS_RESOURCE: u32 = 24;

/// The first kernel with `CAP_BPF` and `CAP_PERFMON`.
const SPLIT_CAPS: (u32, u32) = (5, 8);

/// The first kernel that charges BPF maps to the memory cgroup, not to
/// `RLIMIT_MEMLOCK`.
const MEMCG_CHARGED: (u32, u32) = (5, 11);

/// Locked memory enough for every collector's maps and rings, with room.
pub const MEMLOCK_NEEDED: u64 = 256 << 20;

#[derive(Debug, Error)]
#[error(
    "missing capabilities: {missing} ({why}). Grant them (a DaemonSet's \
     securityContext.capabilities.add, `setpriv --inh-caps`, `capsh`) or run as root"
)]
pub struct PrivilegeError {
    missing: String,
    why: String,
}

/// Capabilities present, and what works without the ones that are not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Privileges {
    /// Capabilities that are missing but only narrow what can be seen,
    /// each with what it costs.
    pub limits: Vec<(&'static str, &'static str)>,
}

impl Privileges {
    /// What `pipelens check` prints on the privileges line.
    pub fn describe(&self) -> String {
        if self.limits.is_empty() {
            return "every capability pipelens uses".to_owned();
        }
        self.limits
            .iter()
            .map(|(cap, cost)| format!("without {cap}: {cost}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Linux took uprobes back from `CAP_PERFMON` ("perf: Require
/// CAP_SYS_ADMIN for uprobes", 6.13, backported to the stable kernels): a
/// uprobe on a data word could corrupt the traced process.
pub const UPROBES_NEED_SYS_ADMIN: &str = "the kernel refuses uprobes, so allocator profiling \
     (`run --memory-allocs`, `pipelens memory --mode allocs`) is unavailable; \
     growth profiling and every other collector work";

/// Whether uprobes can be attached (see [`UPROBES_NEED_SYS_ADMIN`]).
pub fn can_attach_uprobes() -> bool {
    effective() & (1u64 << CAP_SYS_ADMIN) != 0
}

fn effective() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// Judges the agent's capabilities on this kernel and, where the kernel
/// charges BPF maps to `RLIMIT_MEMLOCK`, raises it.
pub fn check() -> Result<Privileges, PrivilegeError> {
    let eff = effective();
    let kernel = nix::sys::utsname::uname()
        .ok()
        .and_then(|u| crate::check::kernel_version(&u.release().to_string_lossy()))
        .unwrap_or(SPLIT_CAPS);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let privileges = judge(eff, kernel, unsafe { libc::geteuid() } == 0)?;
    if eff & (1u64 << CAP_SYS_ADMIN) == 0 && !perf_events_allowed() {
        return Err(paranoid_refusal(perf_event_paranoid()));
    }
    if kernel < MEMCG_CHARGED {
        raise_memlock(eff & (1u64 << CAP_SYS_RESOURCE) != 0)?;
    }
    Ok(privileges)
}

/// Whether this process may open a system-wide perf event, as attaching a
/// tracepoint or a uprobe does: a dummy software event on CPU 0, opened and
/// closed. Debian's and Ubuntu's kernels add a `perf_event_paranoid` level
/// 3 that some of them (Debian's 5.10 and 6.1) lift for `CAP_SYS_ADMIN` only, not
/// for `CAP_PERFMON`.
fn perf_events_allowed() -> bool {
    const PERF_TYPE_SOFTWARE: u32 = 1;
    const PERF_COUNT_SW_DUMMY: u64 = 9;
    const PERF_ATTR_SIZE_VER0: u32 = 64;
    const DISABLED: u64 = 1;
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
    // perf_event_attr, version 0: type, size, config, sample period,
    // sample type, read format, then the flag bits.
    let mut attr = [0u8; PERF_ATTR_SIZE_VER0 as usize];
    attr[0..4].copy_from_slice(&PERF_TYPE_SOFTWARE.to_ne_bytes());
    attr[4..8].copy_from_slice(&PERF_ATTR_SIZE_VER0.to_ne_bytes());
    attr[8..16].copy_from_slice(&PERF_COUNT_SW_DUMMY.to_ne_bytes());
    attr[40..48].copy_from_slice(&DISABLED.to_ne_bytes());
    // SAFETY: perf_event_open reads `attr`, of the size it states; the
    // descriptor it returns is closed at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        // Only a refusal is a verdict: a kernel without perf events fails
        // later with its own error.
        return !matches!(errno, Some(libc::EACCES) | Some(libc::EPERM));
    }
    // SAFETY: `fd` is the descriptor just opened, closed once.
    unsafe { libc::close(fd as libc::c_int) };
    true
}

fn perf_event_paranoid() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why perf events are refused without `CAP_SYS_ADMIN`.
fn paranoid_refusal(paranoid: Option<i32>) -> PrivilegeError {
    let level = paranoid.map_or("unreadable".to_owned(), |p| p.to_string());
    PrivilegeError {
        missing: "CAP_SYS_ADMIN".to_owned(),
        why: format!(
            "the kernel refuses perf events, through which every collector attaches, to \
             CAP_PERFMON: kernel.perf_event_paranoid is {level}, and this kernel's level 3 \
             (a Debian and Ubuntu restriction) admits CAP_SYS_ADMIN only. Lower it \
             (`sysctl kernel.perf_event_paranoid=2`) to run with the least capabilities"
        ),
    }
}

/// The memlock limit as (soft, hard); `u64::MAX` is unlimited.
fn memlock() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    (lim.rlim_cur, lim.rlim_max)
}

fn set_memlock(soft: u64, hard: u64) -> bool {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) == 0 }
}

/// Lifts `RLIMIT_MEMLOCK` for a kernel that charges BPF maps to it: to
/// unlimited where it may (`CAP_SYS_RESOURCE`), else to its hard limit.
fn raise_memlock(sys_resource: bool) -> Result<(), PrivilegeError> {
    let infinity = libc::RLIM_INFINITY;
    let (soft, hard) = memlock();
    if soft == infinity || soft >= MEMLOCK_NEEDED {
        return Ok(());
    }
    if set_memlock(infinity, infinity) {
        log::info!("RLIMIT_MEMLOCK lifted: this kernel charges BPF maps to it");
        return Ok(());
    }
    if (hard == infinity || hard >= MEMLOCK_NEEDED) && set_memlock(hard, hard) {
        return Ok(());
    }
    Err(memlock_refusal(hard, sys_resource))
}

/// Why the memlock limit cannot be raised enough.
fn memlock_refusal(hard: u64, sys_resource: bool) -> PrivilegeError {
    let missing = if sys_resource {
        // Granted, yet refused: a seccomp or LSM rule, not a capability.
        "nothing the capabilities can give".to_owned()
    } else {
        "CAP_SYS_RESOURCE".to_owned()
    };
    PrivilegeError {
        missing,
        why: format!(
            "kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, whose hard limit is {} KiB \
             here and cannot be raised to the {} MiB the collectors' maps may take without \
             CAP_SYS_RESOURCE; or raise the limit (ulimit -l, systemd LimitMEMLOCK=, a \
             container's memlock ulimit)",
            hard / 1024,
            MEMLOCK_NEEDED >> 20
        ),
    }
}

/// The verdict for effective capabilities `eff` on kernel `kernel`.
pub fn judge(eff: u64, kernel: (u32, u32), root: bool) -> Result<Privileges, PrivilegeError> {
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    if kernel < SPLIT_CAPS {
        if !has(CAP_SYS_ADMIN) {
            return Err(PrivilegeError {
                missing: "CAP_SYS_ADMIN".to_owned(),
                why: "kernels before 5.8 load BPF programs for CAP_SYS_ADMIN only".to_owned(),
            });
        }
    } else {
        let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
            .into_iter()
            .filter(|&(bit, _)| !has(bit) && !has(CAP_SYS_ADMIN))
            .map(|(_, name)| name)
            .collect();
        if !missing.is_empty() {
            return Err(PrivilegeError {
                missing: missing.join(", "),
                why: "loading BPF programs and attaching them to tracepoints and uprobes \
                      takes CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), every collector needs them"
                    .to_owned(),
            });
        }
    }
    let mut limits = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        limits.push(("CAP_SYS_ADMIN", UPROBES_NEED_SYS_ADMIN));
    }
    if !has(CAP_SYS_PTRACE) {
        limits.push((
            "CAP_SYS_PTRACE",
            "other users' processes cannot be symbolised or given allocator uprobes \
             (memory collector), nor named from /proc/<pid>/exe",
        ));
    }
    if !root && !has(CAP_DAC_READ_SEARCH) {
        limits.push((
            "CAP_DAC_READ_SEARCH",
            "root-only files (tracefs formats, /proc of other users) are unreadable: \
             collectors whose hooks need them fail",
        ));
    }
    Ok(Privileges { limits })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOUR: u64 =
        1 << CAP_BPF | 1 << CAP_PERFMON | 1 << CAP_SYS_PTRACE | 1 << CAP_DAC_READ_SEARCH;

    #[test]
    fn the_four_capabilities_are_enough_from_5_8() {
        for kernel in [(5, 8), (5, 10), (6, 1), (6, 18)] {
            for root in [true, false] {
                let limits = judge(FOUR, kernel, root).unwrap().limits;
                let names: Vec<_> = limits.iter().map(|(c, _)| *c).collect();
                assert_eq!(names, ["CAP_SYS_ADMIN"], "uprobes only");
            }
        }
        assert!(judge(u64::MAX, (6, 1), false).unwrap().limits.is_empty());
    }

    #[test]
    fn a_missing_capability_is_named_with_why() {
        let err = judge(FOUR & !(1 << CAP_PERFMON), (6, 1), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing capabilities: CAP_PERFMON ("), "{err}");
        assert!(!err.contains("CAP_BPF,"), "{err}");
        let err = judge(0, (6, 1), true).unwrap_err().to_string();
        assert!(err.contains("CAP_BPF, CAP_PERFMON"), "{err}");
        // CAP_SYS_ADMIN stands in for both.
        assert!(judge(1 << CAP_SYS_ADMIN, (6, 1), true).is_ok());
    }

    #[test]
    fn a_memlock_that_cannot_be_raised_names_cap_sys_resource() {
        let err = memlock_refusal(64 * 1024, false).to_string();
        assert!(
            err.starts_with("missing capabilities: CAP_SYS_RESOURCE (")
                && err.contains("before 5.11")
                && err.contains("64 KiB"),
            "{err}"
        );
    }

    #[test]
    fn a_paranoid_kernel_names_cap_sys_admin_and_the_sysctl() {
        let err = paranoid_refusal(Some(3)).to_string();
        assert!(
            err.starts_with("missing capabilities: CAP_SYS_ADMIN (")
                && err.contains("perf_event_paranoid is 3")
                && err.contains("sysctl kernel.perf_event_paranoid=2"),
            "{err}"
        );
    }

    #[test]
    fn before_5_8_only_cap_sys_admin_loads() {
        let err = judge(FOUR, (5, 4), true).unwrap_err().to_string();
        assert!(
            err.contains("CAP_SYS_ADMIN") && err.contains("5.8"),
            "{err}"
        );
        assert!(judge(FOUR | 1 << CAP_SYS_ADMIN, (5, 4), true).is_ok());
    }

    #[test]
    fn missing_visibility_capabilities_are_limits_not_errors() {
        let bare = 1 << CAP_BPF | 1 << CAP_PERFMON;
        let p = judge(bare, (6, 1), false).unwrap();
        let names: Vec<_> = p.limits.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            names,
            ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
        );
        assert!(p.describe().contains("without CAP_SYS_PTRACE: "));
        // Root owns the root-only files.
        let names: Vec<_> = judge(bare, (6, 1), true)
            .unwrap()
            .limits
            .iter()
            .map(|(c, _)| *c)
            .collect();
        assert_eq!(names, ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]);
    }
}
