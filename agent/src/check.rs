//! `pipelens check`: what this host allows, probed for real rather than
//! guessed from the kernel version.

use std::path::Path;

use pipelens_common::config::AgentConfig;

use crate::{btf, collector::CollectorKind, connections, objects, privileges, tracefs};

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
    push(
        "kernel",
        true,
        format!(
            "{} {}",
            uname.sysname().to_string_lossy(),
            uname.release().to_string_lossy()
        ),
    );
    let privileged = privileges::check();
    push(
        "privileges",
        privileged.is_ok(),
        privileged
            .as_ref()
            .map_or_else(|e| e.to_string(), |()| "root".to_owned()),
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
            "unavailable (kernel without CONFIG_KPROBES); not needed: pipelens uses tracepoints and uprobes".to_owned()
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
    if let (Ok(()), Ok(offsets)) = (&privileged, &btf) {
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
                                verify(&loader, "connections", objects::CONNECTIONS)
                            } else {
                                Err(format!("missing tracepoints: {}", missing.join(", ")))
                            }
                        }
                        CollectorKind::Queries | CollectorKind::Websocket => st.clone(),
                        CollectorKind::Memory => crate::memory::probes::verify(&loader),
                    };
                    all_ok &= r.is_ok();
                    push(
                        &format!("collector {kind}"),
                        r.is_ok(),
                        r.err().unwrap_or("usable".into()),
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
            .map_err(|e| format!("{prog_name}: verifier: {e}"))?;
    }
    Ok(())
}
