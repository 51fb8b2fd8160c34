//! Checking, before anything is attempted, that the agent has the
//! capabilities it needs, so that a missing one is named instead of
//! surfacing as an EPERM from deep inside a load.

use thiserror::Error;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, Error)]
#[error(
    "pipelens needs root privileges to load kernel programs; missing capabilities: {missing}. \
     Run it as root or with sudo (`cargo xtask run` does)"
)]
pub struct PrivilegeError {
    missing: String,
}

pub fn check() -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing = missing_caps(eff);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError {
            missing: missing.join(", "),
        })
    }
}

/// CAP_SYS_ADMIN implies the others on kernels before 5.8; it is also what
/// mounting tracefs and bpffs takes.
pub fn missing_caps(eff: u64) -> Vec<&'static str> {
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN");
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_missing_capabilities() {
        assert!(missing_caps(u64::MAX).is_empty());
        assert_eq!(missing_caps(0), ["CAP_SYS_ADMIN", "CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_caps(1 << CAP_BPF), ["CAP_SYS_ADMIN", "CAP_PERFMON"]);
    }
}
