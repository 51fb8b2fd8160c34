//! The guest's whole filesystem, as one initramfs: busybox, the release
//! binaries and probe tests at the same absolute paths as on the host (the
//! tests find their peers by paths compiled into them), the PostgreSQL
//! server and pgbench, and every library `ldd` says they load. The cloud
//! kernels have no 9p, so nothing is shared with the host at run time.

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Builds the archive at `out` holding `files` (absolute host paths, copied
/// with the libraries they need), `trees` (directories copied whole) and an
/// `/init` running `init_script`.
pub fn build(
    out: &Path,
    files: &[PathBuf],
    trees: &[PathBuf],
    init_script: &str,
) -> anyhow::Result<()> {
    let stage = out.with_extension("stage");
    let _ = std::fs::remove_dir_all(&stage);
    for dir in [
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
    ] {
        std::fs::create_dir_all(stage.join(dir))?;
    }
    // The same merged-/usr links as the host, so that a library `ldd`
    // finds under /lib lands where the guest's loader looks for it.
    for top in ["bin", "sbin", "lib", "lib64"] {
        let host = Path::new("/").join(top);
        match std::fs::read_link(&host) {
            Ok(target) => std::os::unix::fs::symlink(target, stage.join(top))?,
            Err(_) => std::fs::create_dir_all(stage.join(top))?,
        }
    }
    std::fs::set_permissions(stage.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox missing: `cargo xtask setup` installs busybox-static");
    }
    copy_file(&stage, busybox)?;
    // PostgreSQL refuses to run as root; the tests switch to this user.
    std::fs::write(
        stage.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\npostgres:x:101:101:PostgreSQL:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    std::fs::write(
        stage.join("etc/group"),
        "root:x:0:\npostgres:x:101:\nnogroup:x:65534:\n",
    )?;
    std::fs::write(
        stage.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;

    let mut wanted: BTreeSet<PathBuf> = files.iter().cloned().collect();
    for f in files {
        wanted.extend(libraries(f)?);
    }
    for tree in trees {
        for f in walk(tree)? {
            if is_elf(&f) {
                wanted.extend(libraries(&f)?);
            }
            wanted.insert(f);
        }
    }
    for f in &wanted {
        copy_file(&stage, f).with_context(|| format!("packing {}", f.display()))?;
    }
    // The probe tests run from their package directory, as under cargo.
    std::fs::create_dir_all(stage.join(crate::root().join("tests").strip_prefix("/")?))?;
    let init = stage.join("init");
    std::fs::write(&init, init_script)?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;

    // `find | cpio -o -H newc`, uncompressed: the kernel unpacks it faster
    // than it could inflate it under emulation.
    let list = Command::new("find")
        .arg(".")
        .current_dir(&stage)
        .output()
        .context("find")?;
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out)?)
        .spawn()
        .context("cpio (installed by `cargo xtask setup`)")?;
    use std::io::Write as _;
    cpio.stdin.take().expect("piped").write_all(&list.stdout)?;
    let status = cpio.wait()?;
    if !status.success() {
        bail!("cpio failed: {status}");
    }
    std::fs::remove_dir_all(&stage)?;
    Ok(())
}

/// Copies host file `at` (an absolute path) to the same path inside
/// `stage`, links kept as links, with what they point to.
fn copy_file(stage: &Path, at: &Path) -> anyhow::Result<()> {
    let from = at;
    let to = stage.join(at.strip_prefix("/").unwrap_or(at));
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        // Keep the link (libraries are found by their soname links) and
        // the file it points to.
        let target = std::fs::read_link(from)?;
        let _ = std::fs::remove_file(&to);
        std::os::unix::fs::symlink(&target, &to)?;
        let resolved = at.parent().unwrap_or(Path::new("/")).join(&target);
        if !stage
            .join(resolved.strip_prefix("/").unwrap_or(&resolved))
            .exists()
        {
            copy_file(stage, &resolved)?;
        }
        return Ok(());
    }
    std::fs::copy(from, &to)?;
    Ok(())
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if std::fs::symlink_metadata(&p)?.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    Ok(out)
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// The shared libraries (and the dynamic loader) `path` loads, from `ldd`.
fn libraries(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !is_elf(path) {
        return Ok(Vec::new());
    }
    let out = Command::new("ldd").arg(path).output().context("ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect())
}
