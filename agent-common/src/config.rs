//! Configuration handed to every kernel object before it is loaded.

/// Selection mode stored in [`AgentConfig::mode`].
pub const MODE_TARGETS: u32 = 0;
/// Every process except the agent itself is a target.
pub const MODE_ALL: u32 = 1;

/// Maximum number of `--comm` names matched at exec time in the kernel.
pub const MAX_COMMS: usize = 8;
/// Length of a task comm including its terminating NUL (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Capacity of the shared map of targeted thread-group ids.
pub const MAX_TARGETS: u32 = 16_384;

/// Global configuration, one copy per kernel object (`AGENT_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AgentConfig {
    /// The agent's own tgid: never traced, whatever the mode.
    pub agent_tgid: u32,
    /// [`MODE_TARGETS`] or [`MODE_ALL`].
    pub mode: u32,
    /// Number of valid entries in `comms`.
    pub comm_count: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// `--comm` names, NUL-padded, compared at `sched_process_exec`.
    pub comms: [[u8; COMM_LEN]; MAX_COMMS],
}

impl AgentConfig {
    pub const fn empty() -> Self {
        Self {
            agent_tgid: 0,
            mode: MODE_TARGETS,
            comm_count: 0,
            _pad: 0,
            comms: [[0; COMM_LEN]; MAX_COMMS],
        }
    }
}

/// Slots of the targets object's per-CPU `TARGET_STATS` array: a failed
/// insert into `TARGETS` (fork or exec of a target while it was full).
pub const TSTAT_TARGETS_FULL: u32 = 0;
pub const TSTAT_COUNT: u32 = 1;

/// `TARGET_STATS` slots counting failed inserts, with the map each is for.
pub const TARGET_MAP_ERRORS: [(u32, &str); 1] = [(TSTAT_TARGETS_FULL, "targets")];

/// Value stored in the `TARGETS` map for a traced tgid.
pub const TARGET_EXPLICIT: u32 = 1;
/// The tgid was added because its parent was a target (fork).
pub const TARGET_CHILD: u32 = 2;
/// The tgid was added because it exec'd a `--comm` name.
pub const TARGET_COMM: u32 = 3;

/// Offset of a tracepoint field, read from tracefs `format`; `u32::MAX` when
/// the field does not exist on this kernel.
pub const FIELD_ABSENT: u32 = u32::MAX;

/// Byte offsets of the kernel structures walked to go from a file
/// descriptor to its `struct sock`, and of the user ABI structures the
/// programs read from user memory, resolved at startup from
/// `/sys/kernel/btf/vmlinux`. Never constants tied to one kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.files`
    pub task_files: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.fd`
    pub fdtable_fd: u32,
    /// `fdtable.max_fds`
    pub fdtable_max_fds: u32,
    /// `file.private_data`
    pub file_private_data: u32,
    /// `file.f_inode`
    pub file_f_inode: u32,
    /// `inode.i_ino`
    pub inode_i_ino: u32,
    /// `inode.i_mode`: a file is a socket when `i_mode & S_IFMT ==
    /// S_IFSOCK`, checked before its `private_data` is read as one.
    pub inode_i_mode: u32,
    /// `socket.sk`
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_family`
    pub sk_family: u32,
    /// `sock.__sk_common.skc_num` (local port, host order)
    pub sk_num: u32,
    /// `sock.__sk_common.skc_dport` (remote port, network order)
    pub sk_dport: u32,
    /// `sock.__sk_common.skc_rcv_saddr`
    pub sk_rcv_saddr: u32,
    /// `sock.__sk_common.skc_daddr`
    pub sk_daddr: u32,
    /// `sock.__sk_common.skc_v6_rcv_saddr`
    pub sk_v6_rcv_saddr: u32,
    /// `sock.__sk_common.skc_v6_daddr`
    pub sk_v6_daddr: u32,
    /// `sock.sk_protocol`
    pub sk_protocol: u32,
    /// `sock.sk_err`
    pub sk_err: u32,
    /// `sock.__sk_common.skc_state`
    pub sk_state: u32,
    /// `task_struct.group_leader`
    pub task_group_leader: u32,
    /// `task_struct.comm`
    pub task_comm: u32,
    /// `task_struct.stack` (the kernel stack; user registers at its top)
    pub task_stack: u32,
    /// `user_msghdr.msg_iov` (user memory, `sendmsg`/`recvmsg`)
    pub msghdr_msg_iov: u32,
    /// `user_msghdr.msg_iovlen`
    pub msghdr_msg_iovlen: u32,
    /// `iovec.iov_base` and `iovec.iov_len`; they are 8 bytes apart, so
    /// that one read at the lower of the two gets both.
    pub iovec_iov_base: u32,
    pub iovec_iov_len: u32,
    /// `sizeof(struct iovec)`: the stride of an iovec array.
    pub iovec_size: u32,
    /// `sockaddr_in.sin_port`, `sockaddr_in.sin_addr` (user memory, `connect`)
    pub sockaddr_in_port: u32,
    pub sockaddr_in_addr: u32,
    /// `sockaddr_in6.sin6_port`, `sockaddr_in6.sin6_addr`
    pub sockaddr_in6_port: u32,
    pub sockaddr_in6_addr: u32,
    pub _pad: u32,
}

impl KernelOffsets {
    pub const fn zero() -> Self {
        Self {
            task_files: 0,
            files_fdt: 0,
            fdtable_fd: 0,
            fdtable_max_fds: 0,
            file_private_data: 0,
            file_f_inode: 0,
            inode_i_ino: 0,
            inode_i_mode: 0,
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
            task_group_leader: 0,
            task_comm: 0,
            task_stack: 0,
            msghdr_msg_iov: 0,
            msghdr_msg_iovlen: 0,
            iovec_iov_base: 0,
            iovec_iov_len: 0,
            iovec_size: 0,
            sockaddr_in_port: 0,
            sockaddr_in_addr: 0,
            sockaddr_in6_port: 0,
            sockaddr_in6_addr: 0,
            _pad: 0,
        }
    }
}

/// `S_IFMT` and `S_IFSOCK` of `inode.i_mode` (`include/uapi/linux/stat.h`).
pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;

/// Byte offsets of the `sched` tracepoint fields used to follow targets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SchedTracepointOffsets {
    /// `sched:sched_process_fork.child_pid`
    pub fork_child_pid: u32,
    /// `sched:sched_process_exit.group_dead`, or [`FIELD_ABSENT`].
    pub exit_group_dead: u32,
}
