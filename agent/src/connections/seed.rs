//! Connections that already exist when the agent starts (pooled database
//! connections, long-lived WebSockets), read from `/proc/<pid>/fd` and
//! `/proc/<pid>/net/tcp{,6}` so that their close is counted and the active
//! gauge is right from the first scrape.

use std::{
    collections::{HashMap, HashSet},
    fs,
};

use pipelens_common::connections::{AF_INET, AF_INET6, DIR_INBOUND, DIR_OUTBOUND, SeedKey};

/// One row of `/proc/net/tcp{,6}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpRow {
    pub key: SeedKey,
    pub state: u8,
    pub inode: u64,
}

const TCP_LISTEN: u8 = 0x0A;
const TCP_TIME_WAIT: u8 = 0x06;
const TCP_CLOSE: u8 = 0x07;

/// Parses the text of `/proc/net/tcp` (`family` = AF_INET) or
/// `/proc/net/tcp6` (AF_INET6). Malformed lines are skipped.
pub fn parse_proc_net_tcp(text: &str, family: u16) -> Vec<TcpRow> {
    text.lines()
        .skip(1)
        .filter_map(|line| parse_row(line, family))
        .collect()
}

fn parse_row(line: &str, family: u16) -> Option<TcpRow> {
    let mut it = line.split_whitespace();
    let _sl = it.next()?;
    let (saddr, lport) = parse_endpoint(it.next()?)?;
    let (daddr, rport) = parse_endpoint(it.next()?)?;
    let state = u8::from_str_radix(it.next()?, 16).ok()?;
    // tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    let inode = it.nth(5)?.parse().ok()?;
    Some(TcpRow {
        key: SeedKey {
            saddr,
            daddr,
            family,
            lport,
            rport,
            _pad: 0,
        },
        state,
        inode,
    })
}

/// `0100007F:1F90` → (127.0.0.1 as bytes, 8080). The kernel prints each
/// 32-bit word of the address as a host-order integer.
fn parse_endpoint(s: &str) -> Option<([u8; 16], u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if addr.len() % 8 != 0 || addr.len() > 32 || addr.is_empty() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, chunk) in addr.as_bytes().chunks(8).enumerate() {
        let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Some((out, port))
}

/// Socket inodes held open by `pid`.
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The TCP table of `pid`'s network namespace.
pub fn tcp_table(pid: u32) -> Vec<TcpRow> {
    let mut rows = Vec::new();
    for (file, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            rows.extend(parse_proc_net_tcp(&text, family));
        }
    }
    rows
}

/// A connection found open, with the process holding it.
#[derive(Clone, Debug)]
pub struct Seed {
    pub key: SeedKey,
    pub tgid: u32,
    pub direction: u16,
}

/// Open connections held by `tgids`, and the ports they listen on. A
/// connection whose local port is one the namespace listens on was accepted
/// (inbound); any other was connected.
pub fn find_existing(tgids: &[u32]) -> (Vec<Seed>, Vec<(u16, u32)>) {
    let mut seeds = Vec::new();
    let mut listeners = Vec::new();
    let mut seen = HashSet::new();
    let mut tables: HashMap<String, Vec<TcpRow>> = HashMap::new();
    for &tgid in tgids {
        let inodes = socket_inodes(tgid);
        if inodes.is_empty() {
            continue;
        }
        let ns = fs::read_link(format!("/proc/{tgid}/ns/net"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let rows = tables.entry(ns).or_insert_with(|| tcp_table(tgid));
        seeds.extend(select(rows, &inodes, tgid, &mut seen));
        listeners.extend(
            rows.iter()
                .filter(|r| r.state == TCP_LISTEN && inodes.contains(&r.inode))
                .map(|r| (r.key.lport, tgid)),
        );
    }
    (seeds, listeners)
}

/// The rows of `table` held through `inodes`, classified by direction.
pub fn select(
    table: &[TcpRow],
    inodes: &HashSet<u64>,
    tgid: u32,
    seen: &mut HashSet<u64>,
) -> Vec<Seed> {
    let listening: HashSet<u16> = table
        .iter()
        .filter(|r| r.state == TCP_LISTEN)
        .map(|r| r.key.lport)
        .collect();
    table
        .iter()
        .filter(|r| !matches!(r.state, TCP_LISTEN | TCP_TIME_WAIT | TCP_CLOSE))
        .filter(|r| r.inode != 0 && inodes.contains(&r.inode) && seen.insert(r.inode))
        .map(|r| Seed {
            key: r.key,
            tgid,
            direction: if listening.contains(&r.key.lport) {
                DIR_INBOUND
            } else {
                DIR_OUTBOUND
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from this machine: a listener on 8080 and one connection to it.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 40001 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 40002 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:D432 0100007F:1F90 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0000000000000000
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F91 00000000000000000000000001000000:A000 01 00000000:00000000 00:00000000 00000000     0        0 50001 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn parses_ipv4_rows() {
        let rows = parse_proc_net_tcp(TCP, AF_INET);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1].key.lport, 8080);
        assert_eq!(rows[1].key.rport, 0xD431);
        assert_eq!(&rows[1].key.saddr[..4], &[127, 0, 0, 1]);
        assert_eq!(rows[1].state, 1);
        assert_eq!(rows[1].inode, 40001);
    }

    #[test]
    fn parses_ipv6_rows() {
        let rows = parse_proc_net_tcp(TCP6, AF_INET6);
        assert_eq!(rows.len(), 1);
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        assert_eq!(rows[0].key.saddr, loopback);
        assert_eq!(rows[0].key.lport, 0x1F91);
    }

    #[test]
    fn classifies_direction_by_listening_port() {
        let rows = parse_proc_net_tcp(TCP, AF_INET);
        let inodes = HashSet::from([40001, 40002]);
        let seeds = select(&rows, &inodes, 7, &mut HashSet::new());
        assert_eq!(seeds.len(), 2);
        assert_eq!(seeds[0].direction, DIR_INBOUND);
        assert_eq!(seeds[1].direction, DIR_OUTBOUND);
        assert!(seeds.iter().all(|s| s.tgid == 7));
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let rows = parse_proc_net_tcp("header\n 0: zz:1 00:0 01\n garbage\n", AF_INET);
        assert!(rows.is_empty());
    }
}
