use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use pipelens_common::{
    config::{AgentConfig, KernelOffsets, MAX_TARGETS, MODE_ALL, S_IFMT, S_IFSOCK},
    connections::{AF_INET, SockTuple},
};

/// Written by the loader before the object is loaded.
#[unsafe(no_mangle)]
pub static AGENT_CONFIG: Global<AgentConfig> = Global::new(AgentConfig::empty());

/// Structure offsets resolved from BTF by the loader.
#[unsafe(no_mangle)]
pub static KERNEL_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::zero());

/// Targeted thread-group ids. One map shared by every kernel object of an
/// agent: the loader pins it once and hands the same map to each object.
#[map]
pub static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Reads one field of a global set by the loader (`Global<$ty>`) without
/// copying the whole struct onto the 512-byte BPF stack. A volatile read:
/// the compiler would otherwise fold the global to its initial value.
#[macro_export]
macro_rules! global_field {
    ($global:path, $ty:ty, $field:ident) => {{
        let g = (&raw const $global).cast::<$ty>();
        // SAFETY: `Global<T>` is `repr(transparent)` over an initialised `T`.
        unsafe { core::ptr::read_volatile(&raw const (*g).$field) }
    }};
}

/// Reads one field of `AGENT_CONFIG`, see [`global_field`].
#[macro_export]
macro_rules! config_field {
    ($field:ident) => {
        $crate::global_field!(
            $crate::AGENT_CONFIG,
            pipelens_common::config::AgentConfig,
            $field
        )
    };
}

/// Reads one field of `KERNEL_OFFSETS`, see [`global_field`].
#[macro_export]
macro_rules! kernel_offset {
    ($field:ident) => {
        $crate::global_field!(
            $crate::KERNEL_OFFSETS,
            pipelens_common::config::KernelOffsets,
            $field
        )
    };
}

/// `v`, with everything the compiler knows about its range forgotten, so
/// that a bound check or mask written after it stays in the program. LLVM
/// otherwise drops checks it can prove redundant, or moves them onto a
/// register the verifier tracks less well, and older verifiers (5.10, 6.1)
/// then refuse the pointer arithmetic or helper size that follows.
#[inline(always)]
pub fn opaque<T: Copy>(v: T) -> T {
    // SAFETY: reads a live local.
    unsafe { core::ptr::read_volatile(&v) }
}

/// `(tgid, tid)` of the current task.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// The target filter, run before any other work by every process-context
/// probe: one global read, and one hash lookup unless `--all`.
#[inline(always)]
pub fn is_target(tgid: u32) -> bool {
    if tgid == config_field!(agent_tgid) {
        return false;
    }
    if config_field!(mode) == MODE_ALL {
        return true;
    }
    // SAFETY: the value is only tested for presence.
    unsafe { TARGETS.get(tgid).is_some() }
}

/// Reads a tracepoint field at `offset`, taken from the tracepoint's
/// `format` file by the loader.
#[inline(always)]
pub fn tp_field<T>(ctx: &aya_ebpf::programs::TracePointContext, offset: u32) -> Result<T, i32> {
    // SAFETY: the offset comes from this tracepoint's format file.
    unsafe { ctx.read_at::<T>(offset as usize) }
}

/// The panic handler and license every kernel object needs.
#[macro_export]
macro_rules! kernel_object {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}

#[inline(always)]
pub fn read_kernel<T>(addr: u64) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(addr as *const T) }
}

#[inline(always)]
pub fn read_user<T>(addr: u64) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_user validates the user address.
    unsafe { bpf_probe_read_user(addr as *const T) }
}

/// `kernel_offset!(field)` as a `u64`, ready to add to an address.
macro_rules! off {
    ($field:ident) => {
        kernel_offset!($field) as u64
    };
}

/// The `struct sock` behind file descriptor `fd` of the current task, and
/// its inode number: `current->files->fdt->fd[fd]`, checked to be a socket
/// by its inode's mode, then `->private_data->sk`, with every offset taken
/// from BTF at startup. Unlike the `struct sock` address, which the
/// allocator hands to the next socket as soon as this one is freed, the
/// inode number is not reused, so it tells two connections apart even when
/// one closed unseen.
#[inline(always)]
pub fn sock_of_fd(fd: u64) -> Result<(u64, u64), i32> {
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task + off!(task_files))?;
    let fdt: u64 = read_kernel(files + off!(files_fdt))?;
    let max_fds: u32 = read_kernel(fdt + off!(fdtable_max_fds))?;
    if fd >= max_fds as u64 {
        return Err(-1);
    }
    let fd_array: u64 = read_kernel(fdt + off!(fdtable_fd))?;
    let file: u64 = read_kernel(fd_array + fd * 8)?;
    if file == 0 {
        return Err(-1);
    }
    // Only a socket's `private_data` is a `struct socket`: a pipe's or a
    // regular file's would be read as one, and their bytes taken for a
    // stream. The check is on the inode, which every file has.
    let inode: u64 = read_kernel(file + off!(file_f_inode))?;
    let mode: u16 = read_kernel(inode + off!(inode_i_mode))?;
    if mode & S_IFMT != S_IFSOCK {
        return Err(-1);
    }
    let socket: u64 = read_kernel(file + off!(file_private_data))?;
    if socket == 0 {
        return Err(-1);
    }
    let sk: u64 = read_kernel(socket + off!(socket_sk))?;
    if sk == 0 {
        return Err(-1);
    }
    let ino: u64 = read_kernel(inode + off!(inode_i_ino))?;
    Ok((sk, ino))
}

/// The process's name: the comm of the thread-group leader. The current
/// thread's own comm is often a worker's name (`tokio-runtime-w`), which is
/// not what a `process` label means.
#[inline(always)]
pub fn process_comm() -> [u8; 16] {
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let leader: u64 = read_kernel(task + off!(task_group_leader)).unwrap_or(0);
    if leader != 0
        && let Ok(comm) = read_kernel::<[u8; 16]>(leader + off!(task_comm))
    {
        return comm;
    }
    aya_ebpf::helpers::bpf_get_current_comm().unwrap_or([0; 16])
}

/// Addresses and ports of a socket, read from `struct sock_common`.
#[inline(always)]
pub fn sock_tuple(sk: u64) -> Result<SockTuple, i32> {
    let family: u16 = read_kernel(sk + off!(sk_family))?;
    let lport: u16 = read_kernel(sk + off!(sk_num))?;
    let rport_be: u16 = read_kernel(sk + off!(sk_dport))?;
    let mut a = SockTuple {
        family,
        lport,
        rport: u16::from_be(rport_be),
        ..SockTuple::EMPTY
    };
    if family == AF_INET {
        let s: [u8; 4] = read_kernel(sk + off!(sk_rcv_saddr))?;
        let d: [u8; 4] = read_kernel(sk + off!(sk_daddr))?;
        a.saddr[..4].copy_from_slice(&s);
        a.daddr[..4].copy_from_slice(&d);
    } else {
        a.saddr = read_kernel(sk + off!(sk_v6_rcv_saddr))?;
        a.daddr = read_kernel(sk + off!(sk_v6_daddr))?;
    }
    Ok(a)
}

#[inline(always)]
pub fn sock_protocol(sk: u64) -> Result<u16, i32> {
    read_kernel(sk + off!(sk_protocol))
}

#[inline(always)]
pub fn sock_state(sk: u64) -> Result<u8, i32> {
    read_kernel(sk + off!(sk_state))
}

#[inline(always)]
pub fn sock_err(sk: u64) -> Result<i32, i32> {
    read_kernel(sk + off!(sk_err))
}

/// Adds one to slot `slot` of a per-CPU stats array.
#[inline(always)]
pub fn bump_stat(stats: &PerCpuArray<u64>, slot: u32) {
    if let Some(p) = stats.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU (a program
        // runs with migration disabled).
        unsafe { *p += 1 };
    }
}
