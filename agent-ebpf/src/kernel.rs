use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel},
    macros::map,
    maps::HashMap,
};
use pipelens_common::config::{AgentConfig, KernelOffsets, MAX_TARGETS, MODE_ALL};

/// Written by the loader before the object is loaded.
#[unsafe(no_mangle)]
pub static AGENT_CONFIG: Global<AgentConfig> = Global::new(AgentConfig::empty());

/// Structure offsets resolved from BTF by the loader.
#[unsafe(no_mangle)]
pub static KERNEL_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    fdtable_max_fds: 0,
    file_private_data: 0,
    file_f_op: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_num: 0,
    sk_dport: 0,
    sk_rcv_saddr: 0,
    sk_daddr: 0,
    sk_v6_rcv_saddr: 0,
    sk_v6_daddr: 0,
    sk_protocol: 0,
    sk_err: 0,
    sk_state: 0,
    file_f_inode: 0,
    inode_i_ino: 0,
    task_group_leader: 0,
    task_comm: 0,
    task_stack: 0,
    _pad2: 0,
    socket_file_ops: 0,
});

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

/// The `struct sock` behind file descriptor `fd` of the current task:
/// `current->files->fdt->fd[fd]->private_data->sk`, with every offset taken
/// from BTF at startup.
#[inline(always)]
pub fn sock_of_fd(fd: u64) -> Result<u64, i32> {
    sock_and_inode_of_fd(fd, false).map(|(sk, _)| sk)
}

/// Like [`sock_of_fd`], with the socket's inode number when `inode` is
/// set: unlike the `struct sock` address, which the allocator hands to the
/// next socket as soon as this one is freed, the inode number is not reused,
/// so it tells two connections apart even when one closed unseen.
#[inline(always)]
pub fn sock_and_inode_of_fd(fd: u64, inode: bool) -> Result<(u64, u64), i32> {
    let off = KERNEL_OFFSETS.load();
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task + off.task_files as u64)?;
    let fdt: u64 = read_kernel(files + off.files_fdt as u64)?;
    let max_fds: u32 = read_kernel(fdt + off.fdtable_max_fds as u64)?;
    if fd >= max_fds as u64 {
        return Err(-1);
    }
    let fd_array: u64 = read_kernel(fdt + off.fdtable_fd as u64)?;
    let file: u64 = read_kernel(fd_array + fd * 8)?;
    if file == 0 {
        return Err(-1);
    }
    if off.socket_file_ops != 0 {
        let f_op: u64 = read_kernel(file + off.file_f_op as u64)?;
        if f_op != off.socket_file_ops {
            return Err(-1);
        }
    }
    let socket: u64 = read_kernel(file + off.file_private_data as u64)?;
    if socket == 0 {
        return Err(-1);
    }
    let sk: u64 = read_kernel(socket + off.socket_sk as u64)?;
    if sk == 0 {
        return Err(-1);
    }
    let ino = if inode {
        let i: u64 = read_kernel(file + off.file_f_inode as u64)?;
        read_kernel::<u64>(i + off.inode_i_ino as u64)?
    } else {
        0
    };
    Ok((sk, ino))
}

/// The process's name: the comm of the thread-group leader. The current
/// thread's own comm is often a worker's name (`tokio-runtime-w`), which is
/// not what a `process` label means.
#[inline(always)]
pub fn process_comm() -> [u8; 16] {
    let off = KERNEL_OFFSETS.load();
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let leader: u64 = read_kernel(task + off.task_group_leader as u64).unwrap_or(0);
    if leader != 0
        && let Ok(comm) = read_kernel::<[u8; 16]>(leader + off.task_comm as u64)
    {
        return comm;
    }
    aya_ebpf::helpers::bpf_get_current_comm().unwrap_or([0; 16])
}

/// Addresses and ports of a socket, read from `struct sock_common`.
#[derive(Clone, Copy)]
pub struct SockTuple {
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

#[inline(always)]
pub fn sock_tuple(sk: u64) -> Result<SockTuple, i32> {
    let off = KERNEL_OFFSETS.load();
    let family: u16 = read_kernel(sk + off.sk_family as u64)?;
    let lport: u16 = read_kernel(sk + off.sk_num as u64)?;
    let rport_be: u16 = read_kernel(sk + off.sk_dport as u64)?;
    let mut t = SockTuple {
        family,
        lport,
        rport: u16::from_be(rport_be),
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if family == pipelens_common::connections::AF_INET {
        let s: [u8; 4] = read_kernel(sk + off.sk_rcv_saddr as u64)?;
        let d: [u8; 4] = read_kernel(sk + off.sk_daddr as u64)?;
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
    } else {
        t.saddr = read_kernel(sk + off.sk_v6_rcv_saddr as u64)?;
        t.daddr = read_kernel(sk + off.sk_v6_daddr as u64)?;
    }
    Ok(t)
}

#[inline(always)]
pub fn sock_protocol(sk: u64) -> Result<u16, i32> {
    read_kernel(sk + KERNEL_OFFSETS.load().sk_protocol as u64)
}

#[inline(always)]
pub fn sock_state(sk: u64) -> Result<u8, i32> {
    read_kernel(sk + KERNEL_OFFSETS.load().sk_state as u64)
}

#[inline(always)]
pub fn sock_err(sk: u64) -> Result<i32, i32> {
    read_kernel(sk + KERNEL_OFFSETS.load().sk_err as u64)
}
