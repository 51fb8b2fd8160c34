//! tracefs: making sure it is mounted, and reading tracepoint `format` files
//! so that kernel programs read fields at this kernel's offsets.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;

pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({source}); \
         run `mount -t tracefs tracefs {TRACEFS}` as root"
    )]
    Mount { source: std::io::Error },
    #[error("tracepoint {category}:{name} does not exist on this kernel ({path})")]
    MissingTracepoint {
        category: String,
        name: String,
        path: PathBuf,
    },
    #[error("tracepoint {tracepoint} has no field `{field}`")]
    MissingField { tracepoint: String, field: String },
    #[error("cannot parse {path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// Mounts tracefs at [`TRACEFS`] if it is not there yet (it is not mounted
/// at boot on some distributions and VMs).
pub fn ensure_mounted() -> Result<(), TracefsError> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    let target = std::ffi::CString::new(TRACEFS).expect("static path");
    let fstype = std::ffi::CString::new("tracefs").expect("static string");
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount {
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// The parsed `format` file of one tracepoint.
#[derive(Clone, Debug)]
pub struct TracepointFormat {
    pub id: String,
    pub fields: HashMap<String, Field>,
}

impl TracepointFormat {
    pub fn load(category: &str, name: &str) -> Result<Self, TracefsError> {
        let path = Path::new(TRACEFS)
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = fs::read_to_string(&path).map_err(|_| TracefsError::MissingTracepoint {
            category: category.to_owned(),
            name: name.to_owned(),
            path: path.clone(),
        })?;
        Self::parse(&format!("{category}:{name}"), &text)
            .map_err(|reason| TracefsError::Format { path, reason })
    }

    /// Parses lines such as
    /// `field:__u16 sport; offset:24; size:2; signed:0;` (tab-separated).
    pub fn parse(id: &str, text: &str) -> Result<Self, String> {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in rest.split(';') {
                let part = part.trim();
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse::<u32>().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse::<u32>().ok();
                } else if decl.is_none() && !part.is_empty() && !part.contains(':') {
                    decl = Some(part);
                }
            }
            let decl = decl.ok_or_else(|| format!("no declaration in `{line}`"))?;
            let name = field_name(decl).ok_or_else(|| format!("no field name in `{decl}`"))?;
            let (Some(offset), Some(size)) = (offset, size) else {
                return Err(format!("no offset or size in `{line}`"));
            };
            fields.insert(name.to_owned(), Field { offset, size });
        }
        if fields.is_empty() {
            return Err("no fields".to_owned());
        }
        Ok(Self {
            id: id.to_owned(),
            fields,
        })
    }

    pub fn offset(&self, field: &str) -> Result<u32, TracefsError> {
        self.fields
            .get(field)
            .map(|f| f.offset)
            .ok_or_else(|| TracefsError::MissingField {
                tracepoint: self.id.clone(),
                field: field.to_owned(),
            })
    }

    /// The offset of `field`, or [`pipelens_common::config::FIELD_ABSENT`].
    pub fn offset_or_absent(&self, field: &str) -> u32 {
        self.fields
            .get(field)
            .map_or(pipelens_common::config::FIELD_ABSENT, |f| f.offset)
    }
}

/// `__u8 saddr[4]` → `saddr`; `const void * skaddr` → `skaddr`.
fn field_name(decl: &str) -> Option<&str> {
    let last = decl.split_whitespace().last()?;
    let last = last.trim_start_matches('*');
    let name = last.split('[').next()?;
    (!name.is_empty()).then_some(name)
}

/// Whether `category:name` exists on this kernel.
pub fn exists(category: &str, name: &str) -> bool {
    Path::new(TRACEFS)
        .join("events")
        .join(category)
        .join(name)
        .is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INET_SOCK_SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"
";

    #[test]
    fn parses_a_real_format_file() {
        let f = TracepointFormat::parse("sock:inet_sock_set_state", INET_SOCK_SET_STATE).unwrap();
        assert_eq!(f.offset("skaddr").unwrap(), 8);
        assert_eq!(f.offset("newstate").unwrap(), 20);
        assert_eq!(f.offset("saddr_v6").unwrap(), 40);
        assert_eq!(f.fields["daddr"].size, 4);
        assert_eq!(f.fields["common_pid"].offset, 4);
        assert!(f.offset("nonexistent").is_err());
        assert_eq!(
            f.offset_or_absent("nonexistent"),
            pipelens_common::config::FIELD_ABSENT
        );
    }

    #[test]
    fn data_loc_fields_keep_their_name() {
        let text = "\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n";
        let f = TracepointFormat::parse("sched:sched_process_exec", text).unwrap();
        assert_eq!(f.offset("filename").unwrap(), 8);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(TracepointFormat::parse("x:y", "nothing here").is_err());
        assert!(TracepointFormat::parse("x:y", "field:int a;\toffset:x;\tsize:4;").is_err());
    }
}
