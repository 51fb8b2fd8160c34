//! `pipelens check`: what this host allows, probed for real rather than
//! guessed from the kernel version.

use std::path::Path;

use pipelens_common::config::AgentConfig;

use crate::{btf, collector::CollectorKind, connections, objects, privileges, tracefs};

/// The oldest kernel pipelens runs on, and the ones its kernel matrix
/// tests (README, "Requirements").
pub const MIN_KERNEL: (u32, u32) = (5, 10);
pub const TESTED_KERNELS: &str = "5.10, 6.1, 6.12, 6.18";

/// `(major, minor)` of a kernel release string such as `6.1.0-41-cloud-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

struct Line {
    item: String,
    ok: bool,
    optional: bool,
    detail: String,
}

pub fn run() -> anyhow::Result<bool> {
    let mut lines = Vec::new();
    let mut push = |item: &str, ok: bool, detail: String| {
        lines.push(Line {
            item: item.to_owned(),
            ok,
            optional: item.contains("(optional)"),
            detail,
        })
    };

    let uname = nix::sys::utsname::uname()?;
    let release = uname.release().to_string_lossy().into_owned();
    let supported = kernel_version(&release).is_some_and(|v| v >= MIN_KERNEL);
    push(
        "kernel",
        supported,
        if supported {
            format!("{} {release}", uname.sysname().to_string_lossy())
        } else {
            format!(
                "{release} is older than {}.{}, the oldest kernel pipelens supports \
                 (tested: {TESTED_KERNELS})",
                MIN_KERNEL.0, MIN_KERNEL.1
            )
        },
    );
    let privileged = privileges::check();
    push(
        "privileges",
        privileged.is_ok(),
        privileged
            .as_ref()
            .map_or_else(|e| e.to_string(), privileges::Privileges::describe),
    );
    let btf = btf::kernel_offsets();
    push(
        "kernel BTF",
        btf.is_ok(),
        btf.as_ref()
            .map_or_else(|e| e.to_string(), |_| btf::VMLINUX_BTF.to_owned()),
    );
    let tfs = tracefs::ensure_mounted();
    push(
        "tracefs",
        tfs.is_ok(),
        tfs.as_ref()
            .map_or_else(|e| e.to_string(), |()| tracefs::TRACEFS.to_owned()),
    );
    for (category, name) in [
        ("sched", "sched_process_fork"),
        ("sched", "sched_process_exec"),
        ("sched", "sched_process_exit"),
    ] {
        let ok = tracefs::exists(category, name);
        push(
            &format!("tracepoint {category}:{name}"),
            ok,
            if ok { "present" } else { "missing" }.to_owned(),
        );
    }
    for (_, category, name) in connections::HOOKS {
        let ok = tracefs::exists(category, name);
        push(
            &format!("tracepoint {category}:{name}"),
            ok,
            if ok { "present" } else { "missing" }.to_owned(),
        );
    }
    for (_, category, name) in connections::SYSCALL_HOOKS {
        let ok = tracefs::exists(category, name);
        push(
            &format!("tracepoint {category}:{name} (optional)"),
            ok,
            if ok { "present" } else { "missing" }.to_owned(),
        );
    }
    let kprobes = Path::new(tracefs::TRACEFS).join("kprobe_events").exists();
    push(
        "kprobes (optional)",
        kprobes,
        if kprobes {
            "available".to_owned()
        } else {
            "unavailable (kernel without CONFIG_KPROBES); tracepoints are used instead".to_owned()
        },
    );
    let uprobes = Path::new(tracefs::TRACEFS).join("uprobe_events").exists();
    push(
        "uprobes",
        uprobes,
        if uprobes { "available" } else { "unavailable" }.to_owned(),
    );

    // A collector is usable when its object passes the verifier here and
    // all its hooks exist.
    let mut all_ok = privileged.is_ok() && btf.is_ok() && tfs.is_ok();
    if let (Ok(_), Ok(offsets)) = (&privileged, &btf) {
        match objects::Loader::new(AgentConfig::empty(), *offsets) {
            Ok(loader) => {
                let t = verify(&loader, "targets", objects::TARGETS);
                let st = verify(&loader, "streams", objects::STREAMS);
                push(
                    "payload capture (streams)",
                    st.is_ok(),
                    st.clone().err().unwrap_or("usable".into()),
                );
                push(
                    "collector core (targets)",
                    t.is_ok(),
                    t.err().unwrap_or("usable".into()),
                );
                for kind in CollectorKind::ALL {
                    let r = match kind {
                        CollectorKind::Connections => {
                            let missing = connections::missing_hooks();
                            if missing.is_empty() {
                                // The very start `run` makes: same object,
                                // same hook choice, attached, then dropped.
                                connections::ConnectionsCollector::start(&loader, false)
                                    .map(|c| describe_hooks(&c))
                                    .map_err(|e| e.to_string())
                            } else {
                                Err(format!("missing tracepoints: {}", missing.join(", ")))
                            }
                        }
                        CollectorKind::Queries | CollectorKind::Websocket => {
                            st.clone().map(|()| "usable".to_owned())
                        }
                        CollectorKind::Memory => {
                            crate::memory::probes::verify(&loader).map(|hooks| {
                                let parts: Vec<String> = hooks
                                    .describe()
                                    .iter()
                                    .map(|(what, how)| format!("{what} by {how}"))
                                    .collect();
                                format!("usable; {}", parts.join(", "))
                            })
                        }
                    };
                    all_ok &= r.is_ok();
                    push(
                        &format!("collector {kind}"),
                        r.is_ok(),
                        match r {
                            Ok(detail) => detail,
                            Err(e) => e,
                        },
                    );
                }
            }
            Err(e) => {
                all_ok = false;
                push("collectors", false, e.to_string());
            }
        }
    }

    let width = lines.iter().map(|l| l.item.len()).max().unwrap_or(0);
    for l in &lines {
        println!(
            "{:<width$}  {}  {}",
            l.item,
            match (l.ok, l.optional) {
                (true, _) => "ok  ",
                (false, true) => "n/a ",
                (false, false) => "FAIL",
            },
            l.detail
        );
    }
    Ok(all_ok)
}

fn describe_hooks(c: &connections::ConnectionsCollector) -> String {
    let choice = &c.byte_hook;
    let mut s = format!(
        "usable; state changes by {}; bytes by {} on {}",
        c.state_hook,
        choice.hook.name(),
        choice.hook.target()
    );
    for (hook, why) in &choice.passed_over {
        s.push_str(&format!("; not {}: {why}", hook.name()));
    }
    s
}

/// Loads every program of an object (verifier included) without attaching.
fn verify(loader: &objects::Loader, name: &'static str, bytes: &[u8]) -> Result<(), String> {
    let offsets = connections::tracepoint_offsets().unwrap_or_default();
    let mut ebpf = loader
        .load(name, bytes, |l| {
            l.override_global("CONN_TP_OFFSETS", &offsets, false);
        })
        .map_err(|e| e.to_string())?;
    for (prog_name, prog) in ebpf.programs_mut() {
        let tp: &mut aya::programs::TracePoint =
            prog.try_into().map_err(|e| format!("{prog_name}: {e}"))?;
        tp.load()
            .map_err(|e| format!("{prog_name}: {}", objects::verifier_reason(&e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_compare_with_the_minimum() {
        assert_eq!(kernel_version("5.10.0-32-cloud-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("6.18.44-fc-v1045"), Some((6, 18)));
        assert_eq!(kernel_version("4.19.0-27-amd64"), Some((4, 19)));
        assert!(kernel_version("4.19.0").unwrap() < MIN_KERNEL);
        assert!(kernel_version("6.1.0").unwrap() >= MIN_KERNEL);
        assert_eq!(kernel_version("garbage"), None);
    }
}
