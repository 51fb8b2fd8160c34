//! Kernel structure offsets resolved from `/sys/kernel/btf/vmlinux`, so that
//! the one walk the kernel programs make through kernel structs (file
//! descriptor → inode → `struct sock`) is right on any kernel, never a
//! constant tied to one build; likewise the user ABI structures they read
//! from user memory (`user_msghdr`, `iovec`, `sockaddr_in{,6}`), which fall
//! back to their x86_64 ABI offsets, with a logged reason, only on a kernel
//! whose BTF does not describe them.

use std::{fs, path::Path};

use btf_rs::{Btf, BtfType, Type};
use pipelens_common::config::KernelOffsets;
use thiserror::Error;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "cannot read kernel BTF at {VMLINUX_BTF} ({0}); a kernel built with CONFIG_DEBUG_INFO_BTF=y is required"
    )]
    Unavailable(String),
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF: struct `{strukt}` has no member `{path}`")]
    NoMember { strukt: String, path: String },
    #[error("kernel BTF has no function `{0}`")]
    NoFunction(String),
    #[error("kernel BTF: {0}")]
    Parse(String),
}

/// Offsets of the fields read by `sock_of_fd` and friends in the kernel
/// programs, and of the user ABI structures they read from user memory.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| BtfError::Unavailable(e.to_string()))?;
    let r = Resolver { btf: &btf };
    let user = |strukt: &str, path: &str, abi: u32| r.user_abi_offset(strukt, path, abi);
    let offsets = KernelOffsets {
        task_files: r.offset_of("task_struct", "files")?,
        files_fdt: r.offset_of("files_struct", "fdt")?,
        fdtable_fd: r.offset_of("fdtable", "fd")?,
        fdtable_max_fds: r.offset_of("fdtable", "max_fds")?,
        file_private_data: r.offset_of("file", "private_data")?,
        file_f_inode: r.offset_of("file", "f_inode")?,
        inode_i_ino: r.offset_of("inode", "i_ino")?,
        inode_i_mode: r.offset_of("inode", "i_mode")?,
        socket_sk: r.offset_of("socket", "sk")?,
        sk_family: r.offset_of("sock", "__sk_common.skc_family")?,
        sk_num: r.offset_of("sock", "__sk_common.skc_num")?,
        sk_dport: r.offset_of("sock", "__sk_common.skc_dport")?,
        sk_rcv_saddr: r.offset_of("sock", "__sk_common.skc_rcv_saddr")?,
        sk_daddr: r.offset_of("sock", "__sk_common.skc_daddr")?,
        sk_v6_rcv_saddr: r.offset_of("sock", "__sk_common.skc_v6_rcv_saddr")?,
        sk_v6_daddr: r.offset_of("sock", "__sk_common.skc_v6_daddr")?,
        sk_protocol: r.offset_of("sock", "sk_protocol")?,
        sk_err: r.offset_of("sock", "sk_err")?,
        sk_state: r.offset_of("sock", "__sk_common.skc_state")?,
        task_group_leader: r.offset_of("task_struct", "group_leader")?,
        task_comm: r.offset_of("task_struct", "comm")?,
        task_stack: r.offset_of("task_struct", "stack")?,
        msghdr_msg_iov: user("user_msghdr", "msg_iov", 16),
        msghdr_msg_iovlen: user("user_msghdr", "msg_iovlen", 24),
        iovec_iov_base: user("iovec", "iov_base", 0),
        iovec_iov_len: user("iovec", "iov_len", 8),
        iovec_size: r.user_abi_size("iovec", 16),
        sockaddr_in_port: user("sockaddr_in", "sin_port", 2),
        sockaddr_in_addr: user("sockaddr_in", "sin_addr", 4),
        sockaddr_in6_port: user("sockaddr_in6", "sin6_port", 2),
        sockaddr_in6_addr: user("sockaddr_in6", "sin6_addr", 8),
        _pad: 0,
    };
    check_iovec(&offsets)?;
    Ok(offsets)
}

/// The kernel programs read an iovec's two fields in one helper call: they
/// must be adjacent 8-byte fields inside the struct.
fn check_iovec(o: &KernelOffsets) -> Result<(), BtfError> {
    let (lo, hi) = (
        o.iovec_iov_base.min(o.iovec_iov_len),
        o.iovec_iov_base.max(o.iovec_iov_len),
    );
    if hi - lo != 8 || hi + 8 > o.iovec_size {
        return Err(BtfError::Parse(format!(
            "struct iovec: iov_base at {}, iov_len at {}, size {}: not two adjacent 8-byte fields",
            o.iovec_iov_base, o.iovec_iov_len, o.iovec_size
        )));
    }
    Ok(())
}

struct Resolver<'a> {
    btf: &'a Btf,
}

impl Resolver<'_> {
    /// Offset of a member of a user ABI structure (one the kernel copies
    /// from user memory, fixed by the x86_64 ABI): from BTF, or when this
    /// kernel's BTF does not describe it, the ABI's own offset `abi`, with
    /// the reason logged.
    fn user_abi_offset(&self, strukt: &str, path: &str, abi: u32) -> u32 {
        match self.offset_of(strukt, path) {
            Ok(off) => {
                if off != abi {
                    log::warn!(
                        "kernel BTF: {strukt}.{path} at {off}, not at its x86_64 ABI offset {abi}"
                    );
                }
                off
            }
            Err(e) => {
                log::info!(
                    "{e}; using the x86_64 user ABI offset {abi} of {strukt}.{path} (ABI-stable)"
                );
                abi
            }
        }
    }

    /// Size of a user ABI structure, likewise.
    fn user_abi_size(&self, strukt: &str, abi: u32) -> u32 {
        match self.find_struct(strukt) {
            Ok(s) => s.size() as u32,
            Err(e) => {
                log::info!(
                    "{e}; using the x86_64 user ABI size {abi} of struct {strukt} (ABI-stable)"
                );
                abi
            }
        }
    }

    /// The struct named `strukt` that has members (not a forward
    /// declaration).
    fn find_struct(&self, strukt: &str) -> Result<btf_rs::Struct, BtfError> {
        self.btf
            .resolve_types_by_name(strukt)
            .map_err(|_| BtfError::NoStruct(strukt.to_owned()))?
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))
    }

    /// Byte offset of `path` (dot-separated, anonymous unions and structs
    /// looked through) inside struct `strukt`.
    fn offset_of(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut current = self.find_struct(strukt)?;
        let mut bits = 0u32;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (off, ty) =
                self.find_member(&current, part)?
                    .ok_or_else(|| BtfError::NoMember {
                        strukt: strukt.to_owned(),
                        path: path.to_owned(),
                    })?;
            bits += off;
            if i + 1 < parts.len() {
                current = match self.strip(ty)? {
                    Type::Struct(s) | Type::Union(s) => s,
                    _ => {
                        return Err(BtfError::NoMember {
                            strukt: strukt.to_owned(),
                            path: path.to_owned(),
                        });
                    }
                };
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Parse(format!("{strukt}.{path} is a bitfield")));
        }
        Ok(bits / 8)
    }

    /// Finds `name` among the members of `s`, descending into anonymous
    /// members; returns its bit offset relative to `s` and its type.
    fn find_member(&self, s: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>, BtfError> {
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            let ty = self
                .btf
                .resolve_chained_type(m)
                .map_err(|e| BtfError::Parse(e.to_string()))?;
            if mname == name {
                return Ok(Some((m.bit_offset(), ty)));
            }
            if mname.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = self.strip(ty)?
                && let Some((off, t)) = self.find_member(&inner, name)?
            {
                return Ok(Some((m.bit_offset() + off, t)));
            }
        }
        Ok(None)
    }

    /// Looks through typedefs and qualifiers.
    fn strip(&self, mut ty: Type) -> Result<Type, BtfError> {
        for _ in 0..16 {
            ty = match ty {
                Type::Typedef(ref t) => self.chained(t)?,
                Type::Const(ref t) | Type::Volatile(ref t) | Type::Restrict(ref t) => {
                    self.chained(t)?
                }
                Type::TypeTag(ref t) => self.chained(t)?,
                other => return Ok(other),
            };
        }
        Err(BtfError::Parse("type chain too long".to_owned()))
    }

    fn chained(&self, t: &dyn BtfType) -> Result<Type, BtfError> {
        self.btf
            .resolve_chained_type(t)
            .map_err(|e| BtfError::Parse(e.to_string()))
    }
}

/// Parameter names of kernel function `name`, from its BTF prototype: the
/// agent picks the program written for that shape (tracing programs read
/// arguments at fixed slots, and signatures change between kernels).
pub fn function_parameters(name: &str) -> Result<Vec<String>, BtfError> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| BtfError::Unavailable(e.to_string()))?;
    let func = btf
        .resolve_types_by_name(name)
        .map_err(|_| BtfError::NoFunction(name.to_owned()))?
        .into_iter()
        .find_map(|t| match t {
            Type::Func(f) => Some(f),
            _ => None,
        })
        .ok_or_else(|| BtfError::NoFunction(name.to_owned()))?;
    let Type::FuncProto(proto) = btf
        .resolve_chained_type(&func)
        .map_err(|e| BtfError::Parse(e.to_string()))?
    else {
        return Err(BtfError::Parse(format!("{name} has no prototype")));
    };
    Ok(proto
        .parameters
        .iter()
        .map(|p| btf.resolve_name(p).unwrap_or_default())
        .collect())
}

/// Address of a kernel symbol from `/proc/kallsyms` (readable with real
/// addresses by root). `None` when hidden or absent.
pub fn kallsyms_address(symbol: &str) -> Option<u64> {
    let text = fs::read_to_string(Path::new("/proc/kallsyms")).ok()?;
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        let addr = it.next()?;
        let _kind = it.next()?;
        let name = it.next()?;
        (name == symbol)
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|a| *a != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this kernel has BTF; a test without it skips, but not under CI.
    fn kernel_btf_present() -> bool {
        if Path::new(VMLINUX_BTF).exists() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{VMLINUX_BTF} missing under CI"
        );
        eprintln!("skipping test - {VMLINUX_BTF} absent");
        false
    }

    /// Reads the running kernel's BTF: every offset must resolve, and the
    /// ones whose layout is fixed by the C standard (first members) are
    /// known exactly.
    #[test]
    fn resolves_on_this_kernel() {
        if !kernel_btf_present() {
            return;
        }
        let off = kernel_offsets().expect("offsets resolve");
        // struct sock starts with struct sock_common; skc_daddr is its first field.
        assert_eq!(off.sk_daddr, 0);
        assert_eq!(off.sk_rcv_saddr, 4);
        assert!(off.sk_num > off.sk_rcv_saddr);
        assert!(off.sk_protocol > off.sk_v6_daddr);
        assert!(off.task_files > 0);
        assert!(off.inode_i_mode < off.inode_i_ino);
    }

    /// The user ABI structures the programs read from user memory are
    /// described by this kernel's BTF, at their x86_64 ABI offsets.
    #[test]
    fn user_abi_structs_are_in_btf() {
        if !kernel_btf_present() {
            return;
        }
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        let r = Resolver { btf: &btf };
        for (strukt, member, abi) in [
            ("user_msghdr", "msg_iov", 16),
            ("user_msghdr", "msg_iovlen", 24),
            ("iovec", "iov_base", 0),
            ("iovec", "iov_len", 8),
            ("sockaddr_in", "sin_port", 2),
            ("sockaddr_in", "sin_addr", 4),
            ("sockaddr_in6", "sin6_port", 2),
            ("sockaddr_in6", "sin6_addr", 8),
        ] {
            assert_eq!(
                r.offset_of(strukt, member).unwrap(),
                abi,
                "{strukt}.{member}"
            );
        }
        assert_eq!(r.find_struct("iovec").unwrap().size(), 16);
        let off = kernel_offsets().unwrap();
        assert_eq!(
            (off.iovec_iov_base, off.iovec_iov_len, off.iovec_size),
            (0, 8, 16)
        );
    }

    #[test]
    fn reads_a_function_prototype() {
        if !kernel_btf_present() {
            return;
        }
        let params = function_parameters("tcp_sendmsg").expect("tcp_sendmsg in BTF");
        assert_eq!(params, ["sk", "msg", "size"]);
        assert!(matches!(
            function_parameters("no_such_function_here"),
            Err(BtfError::NoFunction(_))
        ));
    }
}
