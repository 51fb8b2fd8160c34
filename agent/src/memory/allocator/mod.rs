//! Which allocator a process really calls, and where to put uprobes on it.
//!
//! The executable and every mapped library are read for the functions of
//! the allocators pipelens knows (glibc, jemalloc, mimalloc, tcmalloc),
//! in both symbol tables: `.dynsym` (what a library exports) and
//! `.symtab` (the only place a statically linked allocator shows, e.g.
//! Rust's tikv-jemallocator as `_rjem_malloc`). Each function found
//! becomes a uprobe at its file offset, with the attach cookie
//! ([`call`](pipelens_common::memory::call)) that says where its size and
//! pointer arguments are.
//!
//! - `catalogue`: the allocators' functions, which of them to probe and
//!   with which cookie.
//! - `elf`: one module's symbol tables, segments and jumps, read for them.
//! - `decode`: the few x86-64 and AArch64 instructions that reading needs.
//! - here: the modules of one process, and [`find`] over them.

mod catalogue;
mod decode;
mod elf;

use std::{
    fs,
    path::{Path, PathBuf},
};

use log::{debug, warn};
use thiserror::Error;

pub use catalogue::Family;
pub use elf::ModuleError;
use elf::scan;

use super::maps::{MapsError, Module, ProcessMaps};

/// One allocator function of a process, and where to attach to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocProbe {
    pub family: Family,
    /// The function's name in the module (of its aliases, the plainest).
    pub symbol: String,
    /// The attach cookie: one of [`call`](pipelens_common::memory::call).
    pub call: u64,
    /// The file to attach the uprobe to, as this agent reaches it (through
    /// `/proc/<pid>/root` for a process in a container).
    pub module: PathBuf,
    /// Offset of the function's first instruction in that file.
    pub file_offset: u64,
}

#[derive(Debug, Error)]
pub enum AllocatorError {
    #[error("process {pid} does not exist")]
    NoProcess { pid: u32 },
    #[error(transparent)]
    Maps(MapsError),
    #[error("cannot read {path}, the executable of process {pid}: {source}")]
    Executable {
        pid: u32,
        path: PathBuf,
        source: ModuleError,
    },
    #[error(
        "no allocator pipelens knows (glibc, jemalloc, mimalloc, tcmalloc) in process {pid}; \
         it looked in {}. The executable may be statically linked and stripped of its symbols, \
         or use an allocator pipelens does not know",
        looked_in(.modules)
    )]
    NoAllocator { pid: u32, modules: Vec<String> },
}

fn looked_in(modules: &[String]) -> String {
    if modules.is_empty() {
        "no module (the process maps no code)".to_owned()
    } else {
        modules.join(", ")
    }
}

/// Finds the allocator functions process `pid` has mapped, in its
/// executable and in every library.
pub fn find(pid: u32) -> Result<Vec<AllocProbe>, AllocatorError> {
    let maps = ProcessMaps::read(pid).map_err(|e| match e {
        MapsError::NoProcess { pid } => AllocatorError::NoProcess { pid },
        e => AllocatorError::Maps(e),
    })?;
    // The executable as the maps print it (` (deleted)` included).
    let exe = match fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(target) => Some(target.to_string_lossy().into_owned()),
        Err(e) => {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Err(AllocatorError::NoProcess { pid });
            }
            // A kernel thread has none; without privileges it is hidden.
            debug!("process {pid}: no executable link: {e}");
            None
        }
    };
    let mut modules = maps.modules();
    let printed = |m: &Module| {
        if m.deleted {
            format!("{} (deleted)", m.path)
        } else {
            m.path.clone()
        }
    };
    if let Some(exe) = &exe
        && !modules.iter().any(|m| printed(m) == *exe)
    {
        // Not seen mapped (an unusual loader): read it all the same.
        let (path, deleted) = match exe.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (exe.as_str(), false),
        };
        modules.insert(
            0,
            Module {
                path: path.to_owned(),
                inode: 0,
                deleted,
                start: 0,
                segments: Vec::new(),
            },
        );
    }

    let mut probes = Vec::new();
    let mut looked_in = Vec::new();
    for module in &modules {
        let is_exe = exe.as_deref() == Some(printed(module).as_str());
        let open = if is_exe && (module.deleted || module.segments.is_empty()) {
            PathBuf::from(format!("/proc/{pid}/exe"))
        } else {
            module.open_path(maps.pid)
        };
        looked_in.push(module.path.clone());
        match scan(&open, module) {
            Ok(found) => probes.extend(found.into_iter().map(|f| AllocProbe {
                family: f.family,
                symbol: f.name,
                call: f.call,
                module: open.clone(),
                file_offset: f.file_offset,
            })),
            Err(source) if is_exe => {
                return Err(AllocatorError::Executable {
                    pid,
                    path: open,
                    source,
                });
            }
            Err(ModuleError::NotElf) => debug!("process {pid}: {} is not an ELF file", module.path),
            Err(e) => warn!(
                "process {pid}: skipping {} ({}): {e}",
                module.path,
                open.display()
            ),
        }
    }
    // A library mapped twice (two `dlmopen` namespaces) is one file.
    probes.sort_by(|a, b| (&a.module, a.file_offset).cmp(&(&b.module, b.file_offset)));
    probes.dedup_by(|a, b| a.module == b.module && a.file_offset == b.file_offset);
    if probes.is_empty() {
        return Err(AllocatorError::NoAllocator {
            pid,
            modules: looked_in,
        });
    }
    Ok(probes)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{HashMap, HashSet},
        process::{Command, Stdio},
    };

    use pipelens_common::memory::call::{
        CALLOC, FREE, POSIX_MEMALIGN, REALLOC, SIZE_ARG0 as SIZE0,
    };

    use super::*;

    /// `nm -D --defined-only` of a library: name → address.
    fn nm_dynamic(path: &Path) -> HashMap<String, u64> {
        let out = Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(path)
            .output()
            .expect("nm (binutils) is needed to check file offsets");
        assert!(out.status.success(), "nm {}", path.display());
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let name = f.nth(1)?.split('@').next()?;
                Some((name.to_owned(), addr))
            })
            .collect()
    }

    /// `readelf -lW`'s LOAD lines: (offset, vaddr, filesz).
    fn readelf_loads(path: &Path) -> Vec<(u64, u64, u64)> {
        let out = Command::new("readelf")
            .arg("-lW")
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success());
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| l.trim_start().starts_with("LOAD "))
            .map(|l| {
                let f: Vec<_> = l.split_whitespace().collect();
                (hex(f[1]), hex(f[2]), hex(f[4]))
            })
            .collect()
    }

    #[test]
    fn finds_glibc_in_this_process() {
        let pid = std::process::id();
        let probes = find(pid).unwrap();
        let maps = ProcessMaps::read(pid).unwrap();
        let libc = maps
            .modules()
            .into_iter()
            .find(|m| m.file_name() == "libc.so.6")
            .unwrap();
        let libc_path = libc.open_path(pid);

        let symbols = nm_dynamic(&libc_path);
        let loads = readelf_loads(&libc_path);
        for name in ["malloc", "free", "calloc", "realloc", "posix_memalign"] {
            let vaddr = symbols[name];
            let (offset, start, _) = *loads
                .iter()
                .find(|&&(_, start, size)| start <= vaddr && vaddr < start + size)
                .unwrap();
            let expected = vaddr - start + offset;
            let probe = probes
                .iter()
                .find(|p| p.module == libc_path && p.symbol == name)
                .unwrap_or_else(|| panic!("no probe on {name} in {probes:#?}"));
            assert_eq!(probe.family, Family::Glibc);
            // free is probed past its NULL check (`test %rdi,%rdi; je`).
            let skipped = probe.file_offset - expected;
            assert!(
                skipped == 0 || (name == "free" && (skipped == 5 || skipped == 9)),
                "{name}: {} vs {expected}",
                probe.file_offset
            );
        }
        let call_of = |name: &str| {
            probes
                .iter()
                .find(|p| p.module == libc_path && p.symbol == name)
                .map(|p| p.call)
        };
        assert_eq!(call_of("malloc"), Some(SIZE0));
        assert_eq!(call_of("calloc"), Some(CALLOC));
        assert_eq!(call_of("realloc"), Some(REALLOC));
        assert_eq!(call_of("free"), Some(FREE));
        assert_eq!(call_of("posix_memalign"), Some(POSIX_MEMALIGN));
        assert_eq!(call_of("reallocarray"), None);
        assert!(probes.iter().all(|p| p.family == Family::Glibc));

        // The running malloc, as the dynamic linker resolved it, is where
        // its probe is.
        for name in [c"malloc", c"free"] {
            // SAFETY: dlsym with a valid NUL-terminated name.
            let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as u64;
            let m = maps.find(addr).unwrap();
            let offset = addr - m.start + m.offset;
            let name = name.to_str().unwrap();
            assert!(
                probes.iter().any(|p| p.symbol == name
                    && (p.file_offset == offset
                        || (name == "free" && p.file_offset == offset + 9))),
                "{name} runs at file offset {offset:#x}"
            );
        }
    }

    #[test]
    fn a_missing_process_says_so() {
        let err = find(u32::MAX).unwrap_err();
        assert!(matches!(err, AllocatorError::NoProcess { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("process {} does not exist", u32::MAX)
        );
    }

    /// Kills and reaps the child when dropped, whatever the test did.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_static_program_without_libc_has_no_allocator() {
        let dir = std::env::temp_dir().join(format!("pipelens-nolibc-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let source = dir.join("nolibc.c");
        let exe = dir.join("nolibc");
        fs::write(
            &source,
            r#"
struct timespec { long sec, nsec; };
void _start(void) {
    struct timespec t = { 60, 0 };
    for (;;) {
#if defined(__x86_64__)
        long ret;
        __asm__ volatile ("syscall" : "=a"(ret) : "a"(35), "D"(&t), "S"(0) : "rcx", "r11", "memory");
#elif defined(__aarch64__)
        register long x0 __asm__("x0") = (long)&t;
        register long x1 __asm__("x1") = 0;
        register long x8 __asm__("x8") = 101;
        __asm__ volatile ("svc #0" : "+r"(x0) : "r"(x1), "r"(x8) : "memory");
#else
#error "no raw nanosleep for this architecture"
#endif
    }
}
"#,
        )
        .unwrap();
        let status = Command::new("cc")
            .args([
                "-static",
                "-nostdlib",
                "-no-pie",
                "-fno-stack-protector",
                "-O1",
                "-o",
            ])
            .arg(&exe)
            .arg(&source)
            .status()
            .expect("cc is needed to build the static test program");
        assert!(status.success());
        let child = Child(Command::new(&exe).stdin(Stdio::null()).spawn().unwrap());
        let result = find(child.0.id());
        drop(child);
        let _ = fs::remove_dir_all(&dir);

        let err = result.unwrap_err();
        assert!(matches!(err, AllocatorError::NoAllocator { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(exe.to_str().unwrap()), "{message}");
        assert!(message.contains("stripped"), "{message}");
    }

    /// The allocator libraries of Debian 12 (libjemalloc2,
    /// libtcmalloc-minimal4, libmimalloc2.0), preloaded into `sleep`;
    /// skipped for those not installed.
    #[test]
    fn finds_preloaded_allocators() {
        let dir = Path::new("/usr/lib/x86_64-linux-gnu");
        let libs = [
            ("libjemalloc.so.2", Family::Jemalloc),
            ("libtcmalloc_minimal.so.4", Family::Tcmalloc),
            ("libmimalloc.so.2", Family::Mimalloc),
        ];
        for (lib, family) in libs {
            let path = dir.join(lib);
            if !path.exists() {
                eprintln!("{} is not installed: not checked", path.display());
                continue;
            }
            let child = Child(
                Command::new("sleep")
                    .arg("60")
                    .env("LD_PRELOAD", &path)
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            // The preload is mapped once the dynamic linker ran.
            let pid = child.0.id();
            let mut probes = Vec::new();
            for _ in 0..200 {
                // The dynamic linker maps the preload, then libc.
                if let Ok(found) = find(pid)
                    && found.iter().any(|p| p.family == family)
                    && found.iter().any(|p| p.family == Family::Glibc)
                {
                    probes = found;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            drop(child);
            let ours: Vec<_> = probes.iter().filter(|p| p.family == family).collect();
            let names: HashSet<&str> = ours.iter().map(|p| p.symbol.as_str()).collect();
            for name in ["malloc", "free", "calloc", "realloc"] {
                assert!(names.contains(name), "{lib}: no {name} in {names:?}");
            }
            // The maps name the file the link points to (`.so.4.5.10`).
            let in_lib = |p: &&AllocProbe| {
                let name = p.module.file_name().unwrap().to_str().unwrap();
                name.starts_with(lib)
            };
            assert!(ours.iter().all(in_lib), "{lib}: {ours:#?}");
            // glibc is mapped all the same, and probed: its functions run
            // for no call, as the preload's come first.
            assert!(
                probes
                    .iter()
                    .any(|p| p.family == Family::Glibc && p.symbol == "malloc")
            );

            // Forwarders to probed functions are not probed again.
            let symbols = nm_dynamic(&path);
            let addrs: HashSet<u64> = ours
                .iter()
                .map(|p| {
                    let name = &p.symbol;
                    symbols[name.as_str()]
                })
                .collect();
            match family {
                Family::Jemalloc => {
                    // `operator new[]` is `jmp operator new`; unsized deletes
                    // jump to free through the PLT.
                    assert!(
                        names.contains("_Znwm") && names.contains("mallocx"),
                        "{names:?}"
                    );
                    assert!(
                        !names.contains("_Znam") && !names.contains("_ZdlPv"),
                        "{names:?}"
                    );
                    assert!(
                        names.contains("_ZdlPvm") && names.contains("sdallocx"),
                        "{names:?}"
                    );
                }
                Family::Mimalloc => {
                    assert!(names.contains("mi_malloc_aligned"), "{names:?}");
                    for forwarder in ["mi_free_size", "mi_free_aligned", "_ZdlPvm"] {
                        assert!(
                            !addrs.contains(&symbols[forwarder]),
                            "{forwarder}: {names:?}"
                        );
                    }
                }
                Family::Tcmalloc => {
                    assert!(
                        names.contains("tc_new") && names.contains("memalign"),
                        "{names:?}"
                    );
                    assert!(!addrs.contains(&symbols["posix_memalign"]), "{names:?}");
                }
                Family::Glibc => unreachable!(),
            }
        }
    }
}
