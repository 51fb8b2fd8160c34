use which::which;

/// Building this crate has an undeclared dependency on the `bpf-linker`
/// binary: re-run when it changes (`cargo xtask setup` installs it).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found; run `cargo xtask setup`"),
    }
}
