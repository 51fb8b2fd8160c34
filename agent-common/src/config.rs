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
/// descriptor to its `struct sock`, resolved at startup from
/// `/sys/kernel/btf/vmlinux`. Never constants tied to one kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
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
    /// `file.f_op`
    pub file_f_op: u32,
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
    /// `file.f_inode`
    pub file_f_inode: u32,
    /// `inode.i_ino`
    pub inode_i_ino: u32,
    /// `task_struct.group_leader`
    pub task_group_leader: u32,
    /// `task_struct.comm`
    pub task_comm: u32,
    /// `task_struct.stack` (the kernel stack; user registers at its top)
    pub task_stack: u32,
    pub _pad2: u32,
    /// Address of `socket_file_ops`, so that a file is known to be a socket
    /// before its `private_data` is read as one (0 when unknown).
    pub socket_file_ops: u64,
}

/// Byte offsets of the `sched` tracepoint fields used to follow targets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SchedTracepointOffsets {
    /// `sched:sched_process_fork.child_pid`
    pub fork_child_pid: u32,
    /// `sched:sched_process_exit.group_dead`, or [`FIELD_ABSENT`].
    pub exit_group_dead: u32,
}
