//! What a process has mapped: `/proc/<pid>/maps`, the address ranges, what
//! backs each of them (a file, nothing, or one of the kernel's pseudo
//! mappings) and the executables and libraries among them.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MapsError {
    #[error("process {pid} does not exist")]
    NoProcess { pid: u32 },
    #[error("cannot read /proc/{pid}/maps: {source}")]
    Read { pid: u32, source: io::Error },
    #[error("unexpected line in /proc/{pid}/maps: {line:?}")]
    Parse { pid: u32, line: String },
}

/// One line of `/proc/<pid>/maps`: an address range and what backs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// `s` in the permissions: writes reach the file or other processes.
    /// Private (`p`) mappings are copied on write.
    pub shared: bool,
    /// Offset in the file of `start` (0 for anything but files).
    pub offset: u64,
    /// Inode of the file (0 for anything but files).
    pub inode: u64,
    /// The path as the kernel prints it: `None` for an anonymous mapping;
    /// a pseudo path (`[heap]`, `[stack]`, `[vdso]`, `[anon:name]`) has
    /// inode 0; a file that was deleted (or replaced) since it was mapped
    /// ends in ` (deleted)`. See [`Mapping::backing`].
    ///
    /// The kernel escapes a newline in a file name as `\012` and does not
    /// escape anything else, so the path is kept as printed.
    pub path: Option<String>,
}

/// What backs a mapping, from [`Mapping::path`] and [`Mapping::inode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing<'a> {
    /// No path: anonymous memory (`mmap(MAP_ANONYMOUS)`, a thread's stack,
    /// a malloc arena, the `.bss` of a library past its file).
    Anonymous,
    /// A kernel pseudo path: `[heap]`, `[stack]`, `[vdso]`, `[vvar]`,
    /// `[vsyscall]`, `[anon:name]`, `[uprobes]`...
    Pseudo(&'a str),
    /// A file, by the path it has in the process's mount namespace.
    File(&'a str),
    /// A file deleted (or replaced, as package upgrades do) after it was
    /// mapped; the path it had, without the ` (deleted)` suffix. Only
    /// `/proc/<pid>/map_files/` still reaches it.
    Deleted(&'a str),
}

const DELETED: &str = " (deleted)";

impl Mapping {
    pub fn backing(&self) -> Backing<'_> {
        let Some(path) = self.path.as_deref() else {
            return Backing::Anonymous;
        };
        // A file's path is absolute; the kernel's pseudo names are
        // bracketed and have no inode.
        if self.inode == 0 && path.starts_with('[') && path.ends_with(']') {
            return Backing::Pseudo(path);
        }
        match path.strip_suffix(DELETED) {
            Some(p) => Backing::Deleted(p),
            None => Backing::File(path),
        }
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Private memory that no file backs: what a process grows when it
    /// allocates. `[heap]`, `[stack]` (and the `[stack:tid]` of old
    /// kernels), named anonymous memory (`[anon:name]`) and plain
    /// anonymous mappings; not shared anonymous memory (`/dev/zero
    /// (deleted)`, `[anon_shmem:name]`), files, or the vdso.
    pub fn is_anonymous(&self) -> bool {
        if self.shared {
            return false;
        }
        match self.backing() {
            Backing::Anonymous => true,
            Backing::Pseudo(p) => {
                p == "[heap]" || p.starts_with("[stack") || p.starts_with("[anon:")
            }
            Backing::File(_) | Backing::Deleted(_) => false,
        }
    }
}

/// Parses one line; `None` if it is not a maps line.
fn parse_line(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut field = || {
        let s = rest.trim_start_matches(' ');
        let end = s.find(' ').unwrap_or(s.len());
        rest = &s[end..];
        (end > 0).then_some(&s[..end])
    };
    let (start, end) = field()?.split_once('-')?;
    let perms = field()?.as_bytes();
    let offset = field()?;
    let dev = field()?;
    let inode = field()?;
    if perms.len() != 4 || !dev.contains(':') {
        return None;
    }
    // After the inode the kernel pads with spaces to a column, then prints
    // the path (which may contain spaces, and end with them) up to the
    // newline. An anonymous mapping ends after the inode.
    let path = rest.trim_start_matches(' ');
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        readable: perms[0] == b'r',
        writable: perms[1] == b'w',
        executable: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path: (!path.is_empty()).then(|| path.to_owned()),
    })
}

/// A mapped object that holds code: an executable or a shared library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Path in the process's mount namespace, without ` (deleted)`.
    pub path: String,
    pub inode: u64,
    /// The file was deleted or replaced after it was mapped.
    pub deleted: bool,
    /// Lowest address of the object's mappings (where its first segment,
    /// the ELF header, is).
    pub start: u64,
    /// Every mapping of the object, lowest first.
    pub segments: Vec<Segment>,
}

/// One mapping of a [`Module`]: `[start, end)` holds the file's bytes
/// from `offset` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub executable: bool,
}

impl Module {
    /// The file name, e.g. `libc.so.6`.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// A path under which this agent can open the very file the process
    /// mapped: [`host_path`], or for a deleted file its
    /// `/proc/<pid>/map_files/` entry (which needs root, as following it
    /// takes `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE`).
    pub fn open_path(&self, pid: u32) -> PathBuf {
        match self.segments.first() {
            Some(first) if self.deleted => PathBuf::from(format!(
                "/proc/{pid}/map_files/{:x}-{:x}",
                first.start, first.end
            )),
            _ => host_path(pid, &self.path),
        }
    }
}

/// The mappings of one process, lowest address first.
#[derive(Clone, Debug)]
pub struct ProcessMaps {
    pub pid: u32,
    pub mappings: Vec<Mapping>,
}

impl ProcessMaps {
    pub fn read(pid: u32) -> Result<ProcessMaps, MapsError> {
        let bytes = fs::read(format!("/proc/{pid}/maps")).map_err(|source| {
            // ESRCH: the process exited between the open and the read.
            if source.kind() == io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ESRCH)
            {
                MapsError::NoProcess { pid }
            } else {
                MapsError::Read { pid, source }
            }
        })?;
        // Paths are bytes; one that is not UTF-8 gets replacement
        // characters (and will not open).
        Self::parse(pid, &String::from_utf8_lossy(&bytes))
    }

    /// Parses the text of a maps file.
    pub fn parse(pid: u32, text: &str) -> Result<ProcessMaps, MapsError> {
        let mut mappings = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                parse_line(line).ok_or_else(|| MapsError::Parse {
                    pid,
                    line: line.to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The kernel prints them in order; `find` relies on it.
        mappings.sort_by_key(|m| m.start);
        Ok(ProcessMaps { pid, mappings })
    }

    /// The mapping that holds `addr`.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        m.contains(addr).then_some(m)
    }

    /// `addr` is in private memory that no file backs (see
    /// [`Mapping::is_anonymous`]); false if it is not mapped at all.
    pub fn is_anonymous(&self, addr: u64) -> bool {
        self.find(addr).is_some_and(Mapping::is_anonymous)
    }

    /// The executables and shared libraries the process has mapped: the
    /// file-backed objects with at least one executable mapping (data
    /// files a program maps, like locale archives or fonts, have none), in
    /// the order of their lowest address. A file mapped twice (two
    /// `dlmopen` namespaces) is one module per inode and path.
    pub fn modules(&self) -> Vec<Module> {
        let mut index: HashMap<(&str, u64), usize> = HashMap::new();
        let mut modules: Vec<Module> = Vec::new();
        for m in &self.mappings {
            let (path, deleted) = match m.backing() {
                Backing::File(p) => (p, false),
                Backing::Deleted(p) => (p, true),
                Backing::Anonymous | Backing::Pseudo(_) => continue,
            };
            let segment = Segment {
                start: m.start,
                end: m.end,
                offset: m.offset,
                executable: m.executable,
            };
            // Keyed by the path as printed, so that a deleted file and the
            // one that replaced it under the same name stay apart.
            let key = (m.path.as_deref().unwrap_or_default(), m.inode);
            match index.get(&key) {
                Some(&i) => modules[i].segments.push(segment),
                None => {
                    index.insert(key, modules.len());
                    modules.push(Module {
                        path: path.to_owned(),
                        inode: m.inode,
                        deleted,
                        start: m.start,
                        segments: vec![segment],
                    });
                }
            }
        }
        modules.retain(|m| m.segments.iter().any(|s| s.executable));
        modules
    }
}

/// Where this agent finds a file that process `pid` knows as `path`:
/// through `/proc/<pid>/root`, so that the files of a process in a
/// container (another mount namespace) resolve to its own, not to the
/// host's file of the same name. The plain path when that does not exist
/// (the process is gone, or this agent may not look into its root).
pub fn host_path(pid: u32, path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    // A process that shares our root sees the same files: the plain path
    // then stays valid after it exits (its `/proc/<pid>/root` does not).
    if same_root(pid) {
        return path.to_path_buf();
    }
    // `join` with an absolute path would replace the root, not extend it.
    let relative = path.strip_prefix("/").unwrap_or(path);
    let inside = PathBuf::from(format!("/proc/{pid}/root")).join(relative);
    if inside.exists() {
        inside
    } else {
        path.to_path_buf()
    }
}

/// Whether `pid`'s root directory is ours (not a container's).
fn same_root(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (fs::metadata(format!("/proc/{pid}/root")), fs::metadata("/")) {
        (Ok(theirs), Ok(ours)) => theirs.dev() == ours.dev() && theirs.ino() == ours.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c6a00000-55d0c6a02000 r--p 00000000 08:01 1234567                    /usr/bin/my prog
55d0c6a02000-55d0c6a05000 r-xp 00002000 08:01 1234567                    /usr/bin/my prog
55d0c6a05000-55d0c6a06000 rw-p 00005000 08:01 1234567                    /usr/bin/my prog
55d0c8000000-55d0c8021000 rw-p 00000000 00:00 0                          [heap]
7f1c2e000000-7f1c2e001000 r-xp 00000000 00:1a 99                         /tmp/jit code (deleted)
7f1c2e100000-7f1c2e200000 rw-s 00000000 00:01 4242                       /dev/zero (deleted)
7f1c2e200000-7f1c2e300000 r--p 00000000 08:01 777                        /usr/lib/locale/locale-archive
7f1c2e400000-7f1c2e500000 rw-p 00000000 00:00 0\x20
7f1c2e500000-7f1c2e501000 rw-p 00000000 00:00 0                          [anon:glibc.malloc]
7f1c2e600000-7f1c2e628000 r--p 00000000 fd:00 3146111                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2e628000-7f1c2e79d000 r-xp 00028000 fd:00 3146111                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2e79d000-7f1c2e7f5000 r--p 0019d000 fd:00 3146111                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2e7f5000-7f1c2e7f9000 rw-p 001f4000 fd:00 3146111                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2e7f9000-7f1c2e806000 rw-p 00000000 00:00 0
7ffd5a1e0000-7ffd5a201000 rw-p 00000000 00:00 0                          [stack]
7ffd5a3c4000-7ffd5a3c8000 r--p 00000000 00:00 0                          [vvar]
7ffd5a3c8000-7ffd5a3ca000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_every_kind_of_line() {
        let maps = ProcessMaps::parse(7, MAPS).unwrap();
        assert_eq!(maps.mappings.len(), 18);
        let exe = &maps.mappings[1];
        assert_eq!(
            (exe.start, exe.end, exe.offset),
            (0x55d0c6a02000, 0x55d0c6a05000, 0x2000)
        );
        assert!(exe.readable && !exe.writable && exe.executable && !exe.shared);
        assert_eq!(exe.inode, 1234567);
        assert_eq!(exe.backing(), Backing::File("/usr/bin/my prog"));
        assert_eq!(maps.mappings[3].backing(), Backing::Pseudo("[heap]"));
        assert_eq!(
            maps.mappings[4].backing(),
            Backing::Deleted("/tmp/jit code")
        );
        assert!(maps.mappings[5].shared);
        assert_eq!(
            maps.mappings[7].path, None,
            "trailing space after the inode"
        );
        assert_eq!(maps.mappings[13].backing(), Backing::Anonymous);
        let vsyscall = maps.mappings.last().unwrap();
        assert_eq!(vsyscall.start, 0xffffffffff600000);
        assert_eq!(vsyscall.backing(), Backing::Pseudo("[vsyscall]"));
        assert!(!vsyscall.readable && vsyscall.executable);
    }

    #[test]
    fn rejects_what_is_not_a_maps_line() {
        for bad in [
            "hello",
            "1000-2000 r-xp 0 08:01",
            "zz-2000 r-xp 00000000 08:01 5 /x",
            "1000-2000 r-x 00000000 08:01 5 /x",
        ] {
            let err = ProcessMaps::parse(3, bad).unwrap_err();
            assert!(matches!(err, MapsError::Parse { pid: 3, .. }), "{bad:?}");
        }
        assert!(ProcessMaps::parse(3, "").unwrap().mappings.is_empty());
    }

    #[test]
    fn finds_the_mapping_of_an_address() {
        let maps = ProcessMaps::parse(7, MAPS).unwrap();
        assert_eq!(maps.find(0x55d0c6a02000).unwrap().offset, 0x2000);
        assert_eq!(maps.find(0x55d0c6a04fff).unwrap().offset, 0x2000);
        assert_eq!(maps.find(0x55d0c6a05000).unwrap().offset, 0x5000);
        assert!(maps.find(0x55d0c6a06000).is_none(), "end is exclusive");
        assert!(maps.find(0).is_none());
        assert!(maps.find(u64::MAX).is_none());
        assert!(maps.find(0xffffffffff600800).is_some());
    }

    #[test]
    fn tells_anonymous_memory() {
        let maps = ProcessMaps::parse(7, MAPS).unwrap();
        for anon in [
            0x55d0c8000010,
            0x7f1c2e400000,
            0x7f1c2e500000,
            0x7f1c2e7f9000,
            0x7ffd5a200000,
        ] {
            assert!(maps.is_anonymous(anon), "{anon:#x}");
        }
        for not in [
            0x55d0c6a02000, // code of the executable
            0x55d0c6a05000, // its data (file-backed, private)
            0x7f1c2e000000, // a deleted file
            0x7f1c2e100000, // shared anonymous memory
            0x7ffd5a3c8000, // vdso
            0xffffffffff600000,
            0x1000, // not mapped
        ] {
            assert!(!maps.is_anonymous(not), "{not:#x}");
        }
    }

    #[test]
    fn modules_are_the_mapped_code() {
        let maps = ProcessMaps::parse(7, MAPS).unwrap();
        let modules = maps.modules();
        let names: Vec<_> = modules
            .iter()
            .map(|m| (m.path.as_str(), m.deleted))
            .collect();
        assert_eq!(
            names,
            [
                ("/usr/bin/my prog", false),
                ("/tmp/jit code", true),
                ("/usr/lib/x86_64-linux-gnu/libc.so.6", false),
            ]
        );
        let libc = &modules[2];
        assert_eq!(libc.file_name(), "libc.so.6");
        assert_eq!(libc.start, 0x7f1c2e600000);
        assert_eq!(libc.segments.len(), 4);
        assert_eq!(
            libc.segments[1],
            Segment {
                start: 0x7f1c2e628000,
                end: 0x7f1c2e79d000,
                offset: 0x28000,
                executable: true
            }
        );
        assert_eq!(
            modules[1].open_path(7),
            PathBuf::from("/proc/7/map_files/7f1c2e000000-7f1c2e001000")
        );
    }

    #[test]
    fn reads_its_own_maps() {
        let pid = std::process::id();
        let maps = ProcessMaps::read(pid).unwrap();
        let modules = maps.modules();
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap();
        assert!(
            modules.iter().any(|m| m.path == exe),
            "{exe} not among {modules:#?}"
        );
        assert!(modules.iter().any(|m| m.file_name() == "libc.so.6"));

        let code = reads_its_own_maps as fn() as usize as u64;
        let m = maps.find(code).unwrap();
        assert!(m.executable && m.path.as_deref() == Some(exe));
        assert!(!maps.is_anonymous(code));

        let boxed = Box::new([0u8; 64]);
        assert!(maps.is_anonymous(boxed.as_ptr() as u64), "heap");
        let local = 0u64;
        assert!(maps.is_anonymous(&raw const local as u64), "stack");
        assert!(!maps.is_anonymous(0));
    }

    #[test]
    fn a_missing_process_says_so() {
        let err = ProcessMaps::read(u32::MAX).unwrap_err();
        assert!(matches!(err, MapsError::NoProcess { pid: u32::MAX }));
        assert_eq!(
            err.to_string(),
            format!("process {} does not exist", u32::MAX)
        );
    }

    #[test]
    fn host_paths_go_through_the_process_root() {
        let pid = std::process::id();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(host_path(pid, &exe), exe, "same root: the plain path");
        assert_eq!(
            host_path(pid, "/no/such/file"),
            PathBuf::from("/no/such/file")
        );
        assert_eq!(host_path(u32::MAX, &exe), exe);
    }
}
