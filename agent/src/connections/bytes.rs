//! Which hook counts a connection's bytes on this kernel, chosen at
//! startup, best first:
//!
//! 1. fexit on `tcp_sendmsg` / `tcp_recvmsg`: one trampoline call with the
//!    arguments and the result (5.5+, needs BTF and a kernel that allows
//!    tracing programs; this development host refuses them).
//! 2. kprobe + kretprobe on the same functions (needs CONFIG_KPROBES).
//! 3. the `sock:sock_send_length` / `sock_recv_length` tracepoints (6.3+).
//!
//! All three see the same calls (every TCP send and receive through the
//! socket layer) in the caller's context, so the counts do not depend on
//! the choice. `pipelens check` makes the same choice by the same code.

use aya::{
    Btf, Ebpf,
    programs::{FExit, KProbe},
};

use super::LENGTH_HOOKS;
use crate::{btf, objects, tracefs};

/// The hook kinds, as `pipelens check` and `pipelens_collector_hook_info`
/// name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteHook {
    Fexit,
    Kprobe,
    Tracepoint,
}

impl ByteHook {
    pub fn name(self) -> &'static str {
        match self {
            ByteHook::Fexit => "fexit",
            ByteHook::Kprobe => "kprobe",
            ByteHook::Tracepoint => "tracepoint",
        }
    }

    /// What it attaches to, for reports.
    pub fn target(self) -> &'static str {
        match self {
            ByteHook::Fexit | ByteHook::Kprobe => "tcp_sendmsg,tcp_recvmsg",
            ByteHook::Tracepoint => "sock:sock_send_length,sock:sock_recv_length",
        }
    }
}

/// The hook chosen, and why each better one was passed over.
#[derive(Clone, Debug)]
pub struct ByteHookChoice {
    pub hook: ByteHook,
    pub passed_over: Vec<(ByteHook, String)>,
}

/// The shape of `tcp_recvmsg` on this kernel: the `nonblock` argument went
/// away in 5.19, moving `flags` and the result one slot down.
fn recvmsg_shape() -> Result<RecvShape, String> {
    let params = btf::function_parameters("tcp_recvmsg").map_err(|e| e.to_string())?;
    let names: Vec<&str> = params.iter().map(String::as_str).collect();
    shape_of(&names)
}

fn shape_of(names: &[&str]) -> Result<RecvShape, String> {
    match names {
        [_, _, _, "flags"] => Ok(RecvShape::Flags),
        [_, _, _, "flags", _] => Ok(RecvShape::FlagsAddrLen),
        [_, _, _, "nonblock", "flags", _] => Ok(RecvShape::Nonblock),
        other => Err(format!("tcp_recvmsg has an unknown shape {other:?}")),
    }
}

/// `tcp_recvmsg`'s signatures: `(sk, msg, len, flags)` (6.16+),
/// `(sk, msg, len, flags, addr_len)` (5.19–6.15),
/// `(sk, msg, len, nonblock, flags, addr_len)` (before 5.19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecvShape {
    Flags,
    FlagsAddrLen,
    Nonblock,
}

/// Attaches the best byte counters this kernel offers.
pub fn attach(ebpf: &mut Ebpf) -> Result<ByteHookChoice, String> {
    let mut passed_over: Vec<(ByteHook, String)> = Vec::new();
    for hook in [ByteHook::Fexit, ByteHook::Kprobe, ByteHook::Tracepoint] {
        match try_attach(ebpf, hook) {
            Ok(()) => {
                for (h, why) in &passed_over {
                    log::info!("connections: byte counts not by {}: {why}", h.name());
                }
                return Ok(ByteHookChoice { hook, passed_over });
            }
            Err(why) => passed_over.push((hook, why)),
        }
    }
    Err(format!(
        "no hook can count bytes here: {}",
        passed_over
            .iter()
            .map(|(h, why)| format!("{}: {why}", h.name()))
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

fn try_attach(ebpf: &mut Ebpf, hook: ByteHook) -> Result<(), String> {
    match hook {
        ByteHook::Fexit => {
            let btf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
            let recv = match recvmsg_shape()? {
                RecvShape::Flags => "fexit_tcp_recvmsg",
                RecvShape::FlagsAddrLen => "fexit_tcp_recvmsg_al",
                RecvShape::Nonblock => "fexit_tcp_recvmsg_nb",
            };
            let programs = [("fexit_tcp_sendmsg", "tcp_sendmsg"), (recv, "tcp_recvmsg")];
            let result = programs.iter().try_for_each(|(prog, function)| {
                let p: &mut FExit = program(ebpf, prog)?;
                p.load(function, &btf)
                    .map_err(|e| format!("{prog}: {}", objects::verifier_reason(&e)))?;
                p.attach().map(|_| ()).map_err(|e| format!("{prog}: {e}"))
            });
            if result.is_err() {
                for (prog, _) in programs {
                    if let Ok(p) = program::<FExit>(ebpf, prog) {
                        let _ = p.unload();
                    }
                }
            }
            result
        }
        ByteHook::Kprobe => {
            if !std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists() {
                return Err("no kprobe event source (kernel built without CONFIG_KPROBES)".into());
            }
            let recv = match recvmsg_shape() {
                Ok(RecvShape::Nonblock) => "kprobe_tcp_recvmsg_nb",
                // Without BTF, the current shape is the likelier one.
                _ => "kprobe_tcp_recvmsg",
            };
            let programs = [
                (recv, "tcp_recvmsg"),
                ("kprobe_tcp_sendmsg", "tcp_sendmsg"),
                ("kretprobe_tcp_io", "tcp_sendmsg"),
                ("kretprobe_tcp_io", "tcp_recvmsg"),
            ];
            let mut loaded = std::collections::HashSet::new();
            let result = programs.iter().try_for_each(|(prog, function)| {
                let p: &mut KProbe = program(ebpf, prog)?;
                if loaded.insert(*prog) {
                    p.load()
                        .map_err(|e| format!("{prog}: {}", objects::verifier_reason(&e)))?;
                }
                p.attach(function, 0)
                    .map(|_| ())
                    .map_err(|e| format!("{prog} on {function}: {e}"))
            });
            if result.is_err() {
                for prog in loaded {
                    if let Ok(p) = program::<KProbe>(ebpf, prog) {
                        let _ = p.unload();
                    }
                }
            }
            result
        }
        ByteHook::Tracepoint => {
            let missing: Vec<String> = LENGTH_HOOKS
                .iter()
                .filter(|(_, c, n)| !tracefs::exists(c, n))
                .map(|(_, c, n)| format!("{c}:{n}"))
                .collect();
            if !missing.is_empty() {
                return Err(format!("missing tracepoints {}", missing.join(", ")));
            }
            objects::attach_tracepoints(ebpf, LENGTH_HOOKS).map_err(|e| e.to_string())
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three signatures `tcp_recvmsg` has had, as BTF names them.
    #[test]
    fn recvmsg_shapes_are_told_apart() {
        assert_eq!(
            shape_of(&["sk", "msg", "len", "nonblock", "flags", "addr_len"]),
            Ok(RecvShape::Nonblock)
        );
        assert_eq!(
            shape_of(&["sk", "msg", "len", "flags", "addr_len"]),
            Ok(RecvShape::FlagsAddrLen)
        );
        assert_eq!(
            shape_of(&["sk", "msg", "len", "flags"]),
            Ok(RecvShape::Flags)
        );
        assert!(shape_of(&["sk", "msg", "len", "nonblock", "flags"]).is_err());
        assert!(shape_of(&[]).is_err());
    }
}
