//! Names for stack addresses: `blazesym` reads each module's symbol table
//! and DWARF (lines, inlined calls) and demangles Rust and C++. Addresses
//! are looked up as stated in the file, through the module table taken
//! while the process ran, so that a process which exits mid-profile is
//! still named; a stripped module yields `module+0xoffset`. The
//! symboliser itself is shared by every process (`modules::Modules`):
//! each file is parsed once, whichever process it was reached through.

use std::{collections::HashMap, sync::Arc};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};

use super::{profile::Frame, unwind::ModuleInfo};

/// Looked-up addresses of one process, cached for the life of its
/// profile.
#[derive(Default)]
pub struct Symbols {
    cache: HashMap<u64, Arc<[Frame]>>,
}

impl Symbols {
    /// The frames (innermost first, more than one where calls were
    /// inlined) of each address, looked up in batches per module.
    pub fn resolve(
        &mut self,
        symbolizer: &Symbolizer,
        addresses: impl IntoIterator<Item = u64>,
        module_of: impl Fn(u64) -> Option<ModuleInfo>,
    ) {
        let mut by_module: HashMap<std::path::PathBuf, (ModuleInfo, Vec<u64>)> = HashMap::new();
        for addr in addresses {
            if self.cache.contains_key(&addr) {
                continue;
            }
            match module_of(addr) {
                Some(m) => by_module
                    .entry(m.path.clone())
                    .or_insert_with(|| (m, Vec::new()))
                    .1
                    .push(addr),
                None => {
                    self.cache.insert(addr, unknown(addr));
                }
            }
        }
        for (_, (module, mut addrs)) in by_module {
            addrs.sort_unstable();
            addrs.dedup();
            let svmas: Vec<u64> = addrs.iter().map(|a| module.svma(*a)).collect();
            let src = Source::Elf(Elf::new(&module.path));
            let results = symbolizer
                .symbolize(&src, Input::VirtOffset(&svmas))
                .unwrap_or_default();
            // DWARF names functions by their short name (`alloc_block`);
            // the symbol table has the whole path
            // (`pipelens_alloc_fixture::workload::alloc_block`), which is
            // what a site must be called to be told apart.
            let mut plain = Elf::new(&module.path);
            plain.debug_syms = false;
            let qualified = symbolizer
                .symbolize(&Source::Elf(plain), Input::VirtOffset(&svmas))
                .unwrap_or_default();
            for (i, addr) in addrs.iter().enumerate() {
                let frames = match results.get(i) {
                    Some(Symbolized::Sym(sym)) => {
                        let mut frames = Vec::with_capacity(1 + sym.inlined.len());
                        // Innermost first. blazesym gives each inlined
                        // function the line inside it, and the symbol the
                        // line of its outermost inlined call.
                        let line = |c: Option<&blazesym::symbolize::CodeInfo<'_>>| {
                            c.map(|c| (c.file.to_string_lossy().into_owned(), c.line))
                        };
                        for inl in sym.inlined.iter().rev() {
                            frames.push(frame(
                                &module,
                                *addr,
                                Some(&inl.name),
                                line(inl.code_info.as_ref()),
                                true,
                            ));
                        }
                        let line_of_inner = line(sym.code_info.as_deref());
                        let name = match qualified.get(i) {
                            Some(Symbolized::Sym(q)) => &q.name,
                            _ => &sym.name,
                        };
                        frames.push(frame(&module, *addr, Some(name), line_of_inner, false));
                        frames
                    }
                    _ => vec![frame(&module, *addr, None, None, false)],
                };
                self.cache.insert(*addr, Arc::from(frames));
            }
        }
    }

    /// The frames of an address resolved before (an unknown frame if not).
    pub fn frames(&self, addr: u64) -> Arc<[Frame]> {
        self.cache
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| unknown(addr))
    }
}

/// An address in no known module (JIT code, a mapping gone since).
fn unknown(addr: u64) -> Arc<[Frame]> {
    Arc::from(vec![Frame {
        address: addr,
        module: "[unknown]".into(),
        module_offset: addr,
        function: None,
        file: None,
        line: None,
        inlined: false,
    }])
}

fn frame(
    module: &ModuleInfo,
    addr: u64,
    name: Option<&str>,
    line: Option<(String, Option<u32>)>,
    inlined: bool,
) -> Frame {
    let (file, line) = match line {
        Some((f, l)) => (Some(Arc::from(f)), l),
        None => (None, None),
    };
    Frame {
        address: addr,
        module: module.name.clone(),
        module_offset: module.svma(addr),
        function: name.map(Arc::from),
        file,
        line,
        inlined,
    }
}
