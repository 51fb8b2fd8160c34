//! Gzipped pprof protobuf, for `go tool pprof`, Pyroscope and Grafana.
//!
//! The messages are the prost-derived `perftools.profiles` types of
//! `libdd-profiling-protobuf` (Datadog's libdatadog, `prost_impls`
//! feature): they need neither protoc nor a profiler runtime, where the
//! `pprof` crate's `protos` come only with its CPU profiler and signal
//! handlers and `pprof_util` keeps its types private.

use std::{collections::HashMap, io::Write as _, sync::Arc};

use flate2::{Compression, write::GzEncoder};
use libdd_profiling_protobuf::prost_impls::{self as pb, Message as _};

use super::attribution::site_position;
use crate::memory::profile::{Profile, Stack};

/// The profile as a gzip-compressed `perftools.profiles.Profile`
/// (<https://github.com/google/pprof/blob/main/proto/profile.proto>), for
/// `go tool pprof`, Pyroscope and Grafana: one sample per stack with a
/// value (leaf first, a `truncated` label on truncated stacks), one
/// location per address with its inlined functions innermost first, one
/// function per name and file, one mapping per module from its load bias,
/// the notes as comments, the first column as period type (period: the
/// sampling mean) and default, and `drop_frames` naming the plumbing so
/// that pprof shows the allocation sites of [`site`](super::site) as flat
/// values.
pub fn pprof(profile: &Profile) -> anyhow::Result<Vec<u8>> {
    let bytes = pprof_message(profile).encode_to_vec();
    let mut gz = GzEncoder::new(Vec::with_capacity(bytes.len() / 3), Compression::default());
    gz.write_all(&bytes)?;
    Ok(gz.finish()?)
}

/// The string table: "" first, each string once.
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        Strings {
            table: vec![String::new()],
            index: HashMap::from([(String::new(), 0)]),
        }
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.index.get(s) {
            return id;
        }
        let id = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), id);
        id
    }
}

/// The frames of `stack` cut into pprof locations: the frames of one
/// address, inlined ones first, ending at the frame the address belongs to
/// (`inlined == false`). Recursion through one call site gives the same
/// address twice in a row, as two locations.
fn location_groups<'a>(profile: &Profile, stack: &'a Stack) -> Vec<&'a [usize]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for (k, &i) in stack.frames.iter().enumerate() {
        let frame = &profile.frames[i];
        let next_elsewhere = stack
            .frames
            .get(k + 1)
            .is_none_or(|&n| profile.frames[n].address != frame.address);
        if !frame.inlined || next_elsewhere {
            groups.push(&stack.frames[start..=k]);
            start = k + 1;
        }
    }
    groups
}

/// A module as a pprof mapping, keyed by name and load bias.
struct MappingInfo {
    module: Arc<str>,
    start: u64,
    limit: u64,
    functions: bool,
    filenames: bool,
    line_numbers: bool,
    inline_frames: bool,
}

/// Where `module` goes among the mappings: pprof takes the first mapping
/// for the main binary, the process's executable.
fn mapping_rank(module: &str, process: &str) -> u8 {
    let library = module.starts_with('[') || module.contains(".so");
    if !library && !process.is_empty() && module.starts_with(process) {
        0
    } else if !library {
        1
    } else {
        2
    }
}

/// Frames of this module have no mapping: their address is all there is.
const UNKNOWN_MODULE: &str = "[unknown]";

/// `s` as a literal in an RE2 regular expression.
fn regex_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// pprof's `drop_frames`, so that pprof front ends cut each stack at its
/// allocation site as [`site`](super::site) does: the plumbing functions
/// found inside a site, less every function found at or outside one (the
/// C runtime's `__libc_start_main` between `_start` and `main`, or a stack
/// that is all plumbing). `go tool pprof` scans each stack from its root,
/// and at the first matching frame past a non-matching one, drops that
/// frame and the frames it called. It matches the name cut at its first
/// `(`, so both forms are listed.
fn drop_frames(profile: &Profile, stacks: &[&Stack]) -> String {
    let mut inside = std::collections::BTreeSet::new();
    let mut outside = std::collections::HashSet::new();
    for stack in stacks {
        let Some(at) = site_position(profile, stack) else {
            continue;
        };
        for (k, &i) in stack.frames.iter().enumerate() {
            let name = profile.frames[i].name();
            if k < at {
                inside.insert(name);
            } else {
                outside.insert(name);
            }
        }
    }
    let mut alternatives = std::collections::BTreeSet::new();
    for name in inside.iter().filter(|n| !outside.contains(*n)) {
        if let Some(cut) = name.find('(').filter(|&k| k > 0) {
            alternatives.insert(regex_literal(&name[..cut]));
        }
        alternatives.insert(regex_literal(name));
    }
    alternatives.into_iter().collect::<Vec<_>>().join("|")
}

fn pprof_message(profile: &Profile) -> pb::Profile {
    let mut strings = Strings::new();
    let value_type = |strings: &mut Strings, c: usize| {
        let t = &profile.value_types[c];
        pb::ValueType {
            r#type: strings.id(t.name),
            unit: strings.id(t.unit),
        }
    };
    let sample_types: Vec<pb::ValueType> = (0..profile.value_types.len())
        .map(|c| value_type(&mut strings, c))
        .collect();
    let stacks: Vec<&Stack> = profile
        .stacks
        .iter()
        .filter(|s| s.values.iter().any(|v| *v != 0))
        .collect();

    // Mappings: one per module (and load bias) of the frames in use,
    // from the bias (address - module offset) to past the last address.
    let mut mapping_of: HashMap<(Arc<str>, u64), usize> = HashMap::new();
    let mut infos: Vec<MappingInfo> = Vec::new();
    for &i in stacks.iter().flat_map(|s| &s.frames) {
        let f = &profile.frames[i];
        if &*f.module == UNKNOWN_MODULE {
            continue;
        }
        let bias = f.address.wrapping_sub(f.module_offset);
        let m = *mapping_of
            .entry((f.module.clone(), bias))
            .or_insert_with(|| {
                infos.push(MappingInfo {
                    module: f.module.clone(),
                    start: bias.min(f.address),
                    limit: f.address + 1,
                    functions: false,
                    filenames: false,
                    line_numbers: false,
                    inline_frames: false,
                });
                infos.len() - 1
            });
        let info = &mut infos[m];
        info.start = info.start.min(f.address);
        info.limit = info.limit.max(f.address.saturating_add(1));
        info.functions |= f.function.is_some();
        info.filenames |= f.file.is_some();
        info.line_numbers |= f.line.is_some();
        info.inline_frames |= f.inlined || f.line.is_some();
    }
    let mut order: Vec<usize> = (0..infos.len()).collect();
    order.sort_by_key(|&m| mapping_rank(&infos[m].module, &profile.process));
    let mut mapping_ids = vec![0u64; infos.len()];
    let mut mappings = Vec::with_capacity(infos.len());
    for (n, &m) in order.iter().enumerate() {
        let info = &infos[m];
        mapping_ids[m] = n as u64 + 1;
        mappings.push(pb::Mapping {
            id: n as u64 + 1,
            memory_start: info.start,
            memory_limit: info.limit,
            file_offset: 0,
            filename: strings.id(&info.module),
            build_id: 0,
            has_functions: info.functions,
            has_filenames: info.filenames,
            has_line_numbers: info.line_numbers,
            has_inline_frames: info.inline_frames,
        });
    }

    // Functions by (name, file); locations by their frames; samples.
    let mut function_of: HashMap<(String, Option<Arc<str>>), u64> = HashMap::new();
    let mut functions: Vec<pb::Function> = Vec::new();
    let mut location_of: HashMap<&[usize], u64> = HashMap::new();
    let mut locations: Vec<pb::Location> = Vec::new();
    let mut samples = Vec::with_capacity(stacks.len());
    let truncated_key = strings.id("truncated");
    let truncated_value = strings.id("true");
    for stack in &stacks {
        let mut location_ids = Vec::new();
        for group in location_groups(profile, stack) {
            if let Some(&id) = location_of.get(group) {
                location_ids.push(id);
                continue;
            }
            let id = locations.len() as u64 + 1;
            location_of.insert(group, id);
            let outer = &profile.frames[group[group.len() - 1]];
            let mapping_id = mapping_of
                .get(&(
                    outer.module.clone(),
                    outer.address.wrapping_sub(outer.module_offset),
                ))
                .map_or(0, |&m| mapping_ids[m]);
            // Innermost first: the last line is the function the
            // others were inlined into.
            let lines = group
                .iter()
                .map(|&i| {
                    let f = &profile.frames[i];
                    let key = (f.name(), f.file.clone());
                    let function_id = match function_of.get(&key) {
                        Some(&id) => id,
                        None => {
                            let id = functions.len() as u64 + 1;
                            let name = strings.id(&key.0);
                            functions.push(pb::Function {
                                id,
                                name,
                                // No system name: we have no mangled
                                // name, and pprof leaves a name that
                                // differs from it as it is instead of
                                // cutting `<...>` out of it.
                                system_name: 0,
                                filename: strings.id(f.file.as_deref().unwrap_or("")),
                            });
                            function_of.insert(key, id);
                            id
                        }
                    };
                    pb::Line {
                        function_id,
                        line: f.line.map_or(0, i64::from),
                    }
                })
                .collect();
            locations.push(pb::Location {
                id,
                mapping_id,
                address: outer.address,
                lines,
                is_folded: false,
            });
            location_ids.push(id);
        }
        let labels = if stack.truncated {
            vec![pb::Label {
                key: truncated_key,
                str: truncated_value,
                num: 0,
                num_unit: 0,
            }]
        } else {
            Vec::new()
        };
        samples.push(pb::Sample {
            location_ids,
            values: stack.values.clone(),
            labels,
        });
    }

    let drop_frames = match drop_frames(profile, &stacks) {
        rx if rx.is_empty() => 0,
        rx => strings.id(&rx),
    };
    let period_type = (!profile.value_types.is_empty()).then(|| value_type(&mut strings, 0));
    let default_sample_type = profile
        .value_types
        .first()
        .map_or(0, |t| strings.id(t.name));
    let comment = profile.notes.iter().map(|n| strings.id(n)).collect();
    pb::Profile {
        sample_types,
        samples,
        mappings,
        locations,
        functions,
        string_table: strings.table,
        drop_frames,
        keep_frames: 0,
        time_nanos: profile.start_unix_nanos,
        duration_nanos: i64::try_from(profile.duration.as_nanos()).unwrap_or(i64::MAX),
        period_type,
        period: i64::try_from(profile.sample_mean_bytes).unwrap_or(i64::MAX),
        comment,
        default_sample_type,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::super::fixture::{APP, PLUGIN, synthetic};
    use super::*;

    fn decode(gz: &[u8]) -> pb::Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .expect("gzip");
        pb::Profile::decode(raw.as_slice()).expect("perftools.profiles.Profile")
    }

    #[test]
    fn pprof_round_trip() {
        let p = synthetic();
        let bytes = pprof(&p).unwrap();
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip magic");
        let d = decode(&bytes);
        let st = &d.string_table;
        let s = |i: i64| st[usize::try_from(i).unwrap()].as_str();

        // String table: "" first, each string once.
        assert_eq!(st[0], "");
        let mut sorted = st.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), st.len(), "duplicate strings");

        let types: Vec<(&str, &str)> = d
            .sample_types
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(
            types,
            [
                ("alloc_space", "bytes"),
                ("alloc_objects", "count"),
                ("inuse_space", "bytes"),
                ("inuse_objects", "count"),
            ]
        );
        let period = d.period_type.unwrap();
        assert_eq!((s(period.r#type), s(period.unit)), ("alloc_space", "bytes"));
        assert_eq!(d.period, 512 * 1024);
        assert_eq!(s(d.default_sample_type), "alloc_space");
        assert_eq!(d.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(d.duration_nanos, 10_000_000_000);
        // pprof front ends cut the stacks at their sites.
        assert_eq!(
            s(d.drop_frames),
            "__rust_alloc|__rust_alloc_zeroed|alloc::raw_vec::RawVecInner<A>::grow_one|calloc|malloc"
        );
        assert_eq!(
            regex_literal("operator new[](unsigned long)"),
            r"operator new\[\]\(unsigned long\)"
        );
        let comments: Vec<&str> = d.comment.iter().map(|&c| s(c)).collect();
        assert_eq!(comments, ["the process exited before the end"]);

        // Samples: every stack with a value, the values as they were.
        assert_eq!(d.samples.len(), 5);
        for c in 0..4 {
            let sum: i64 = d.samples.iter().map(|x| x.values[c]).sum();
            assert_eq!(sum, p.total(c));
        }
        let truncated: Vec<bool> = d.samples.iter().map(|x| !x.labels.is_empty()).collect();
        assert_eq!(truncated, [false, false, true, false, false]);
        assert_eq!(s(d.samples[2].labels[0].key), "truncated");

        // One location per address (read_header and load share one), one
        // function per name and file (both app::main lines are one).
        assert_eq!(d.locations.len(), 12);
        assert_eq!(d.functions.len(), 12);
        let function = |id: u64| &d.functions[usize::try_from(id).unwrap() - 1];
        let location = |id: u64| &d.locations[usize::try_from(id).unwrap() - 1];
        for (i, l) in d.locations.iter().enumerate() {
            assert_eq!(l.id, i as u64 + 1);
        }
        for (i, f) in d.functions.iter().enumerate() {
            assert_eq!(f.id, i as u64 + 1);
            assert_eq!(f.system_name, 0, "no mangled names");
            assert!(usize::try_from(f.name).unwrap() < st.len());
        }
        // The first sample: leaf first; the inlined location lists the
        // inlined function first and its caller last.
        let first = &d.samples[0];
        let names: Vec<Vec<String>> = first
            .location_ids
            .iter()
            .map(|&id| {
                location(id)
                    .lines
                    .iter()
                    .map(|l| format!("{}:{}", s(function(l.function_id).name), l.line))
                    .collect()
            })
            .collect();
        assert_eq!(
            names,
            [
                vec!["malloc:0".to_string()],
                vec!["__rust_alloc:0".to_string()],
                vec![
                    "app::parse::read_header:12".to_string(),
                    "app::parse::load:40".to_string()
                ],
                vec!["app::main:7".to_string()],
                vec!["__libc_start_call_main:0".to_string()],
            ]
        );
        let parse = location(first.location_ids[2]);
        assert_eq!(parse.address, APP + 0x2400);
        assert_eq!(
            s(function(parse.lines[0].function_id).filename),
            "src/parse.rs"
        );

        // Mappings: the executable first, each module from its load bias.
        let files: Vec<&str> = d.mappings.iter().map(|m| s(m.filename)).collect();
        assert_eq!(files, ["app", "libc.so.6", "libplugin.so"]);
        let app = &d.mappings[0];
        assert_eq!((app.memory_start, app.memory_limit), (APP, APP + 0x6001));
        assert!(app.has_functions && app.has_filenames && app.has_line_numbers);
        let plugin = &d.mappings[2];
        assert!(!plugin.has_functions);
        assert_eq!(plugin.memory_start, PLUGIN);
        for l in &d.locations {
            let m = &d.mappings[usize::try_from(l.mapping_id).unwrap() - 1];
            assert!(m.memory_start <= l.address && l.address < m.memory_limit);
        }
    }

    /// `go tool pprof` reads the profile: the functions and the totals.
    /// Needs Go (`golang-go`); skipped without it unless `CI=true`.
    #[test]
    fn go_tool_pprof_reads_it() {
        let p = synthetic();
        let path =
            std::env::temp_dir().join(format!("pipelens-report-test-{}.pb.gz", std::process::id()));
        std::fs::write(&path, pprof(&p).unwrap()).unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new("go")
                .args(["tool", "pprof"])
                .args(args)
                .arg(&path)
                .env("PPROF_TMPDIR", std::env::temp_dir())
                .output()
        };
        let top = match run(&["-top", "-sample_index=alloc_space"]) {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = std::fs::remove_file(&path);
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "go is not on PATH: CI needs golang-go to check the pprof output"
                );
                eprintln!("skipped: go is not on PATH (install golang-go)");
                return;
            }
            Err(e) => panic!("go tool pprof: {e}"),
        };
        let raw = run(&["-raw"]).unwrap();
        let _ = std::fs::remove_file(&path);
        let top_out = String::from_utf8_lossy(&top.stdout);
        let raw_out = String::from_utf8_lossy(&raw.stdout);
        println!("{top_out}\n{}", String::from_utf8_lossy(&top.stderr));
        println!("{raw_out}\n{}", String::from_utf8_lossy(&raw.stderr));
        assert!(top.status.success() && raw.status.success());
        assert!(top_out.contains("Type: alloc_space"), "{top_out}");
        // pprof picks its own unit: 12.5 MiB is "12800kB" or "12.50MB".
        assert!(
            top_out.contains("12800kB total") || top_out.contains("12.50MB total"),
            "{top_out}"
        );
        // drop_frames cut the stacks at their sites: the sites of the text
        // report hold the bytes themselves ("flat"), in the same order,
        // and the allocator frames are gone.
        let flat: Vec<String> = top_out
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("flat"))
            .skip(1)
            .filter(|l| !l.trim_start().starts_with('0'))
            .map(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                // flat% and name: pprof versions differ in their units.
                format!("{} {}", cells[1], cells[5..].join(" "))
            })
            .collect();
        assert_eq!(
            flat,
            [
                "64.00% app::parse::read_header (inline)",
                "24.00% libplugin.so+0x4567",
                "8.00% app::cache::insert",
                "4.00% __libc_start_call_main",
            ],
            "{top_out}"
        );
        assert!(!top_out.contains("malloc"), "{top_out}");
        // Names as we gave them, not cut down by pprof's demangler.
        assert!(top_out.contains("app::worker<[u8; 4]>"), "{top_out}");
        for name in [
            "app::parse::read_header",
            "app::parse::load",
            "app::main",
            "libplugin.so+0x4567",
            "app::cache::insert",
            "malloc",
            "calloc",
        ] {
            assert!(raw_out.contains(name), "{name} missing from\n{raw_out}");
        }
        // Every column's values, and the notes.
        assert!(
            raw_out.contains(
                "alloc_space/bytes[dflt] alloc_objects/count inuse_space/bytes inuse_objects/count"
            ),
            "{raw_out}"
        );
        assert!(
            raw_out.contains("1048576         10     524288          5:"),
            "{raw_out}"
        );
        assert!(raw_out.contains("truncated:[true]"), "{raw_out}");
        assert!(
            raw_out.contains("Comment: the process exited before the end"),
            "{raw_out}"
        );
        assert!(raw_out.contains("Period: 524288"), "{raw_out}");
    }
}
