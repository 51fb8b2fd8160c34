//! Which session is a subscriber and how each session ends, decided before
//! any connection is opened so that the counts are exact and reproducible.

use std::{fmt, str::FromStr};

use serde::Serialize;

/// How a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CloseKind {
    /// A Close frame with this status code, then the closing handshake.
    Code(u16),
    /// The TCP connection is reset (SO_LINGER 0) without any Close frame.
    Abrupt,
}

impl fmt::Display for CloseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseKind::Code(code) => write!(f, "{code}"),
            CloseKind::Abrupt => f.write_str("abrupt"),
        }
    }
}

impl Serialize for CloseKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseMixError {
    #[error("`{0}` is not CLOSE=WEIGHT (e.g. 1000=2)")]
    Syntax(String),
    #[error(
        "{0} cannot be sent in a Close frame (RFC 6455 §7.4: use 1000-1003, 1007-1014 or 3000-4999)"
    )]
    Code(u16),
    #[error("`{0}` is listed twice")]
    Duplicate(String),
    #[error("the weights add up to zero")]
    Empty,
}

/// Weighted close kinds: `1000=2,1001=1,abrupt=1` ends half the sessions
/// with 1000, a quarter with 1001 and resets a quarter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseMix {
    entries: Vec<(CloseKind, u32)>,
}

/// Status codes an endpoint may put in a Close frame (RFC 6455 §7.4.1–2;
/// 1012–1014 were registered with IANA later).
fn sendable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

impl FromStr for CloseMix {
    type Err = CloseMixError;

    fn from_str(spec: &str) -> Result<CloseMix, CloseMixError> {
        let mut entries: Vec<(CloseKind, u32)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let syntax = || CloseMixError::Syntax(part.to_owned());
            let (name, weight) = part.split_once('=').ok_or_else(syntax)?;
            let weight: u32 = weight.trim().parse().map_err(|_| syntax())?;
            let kind = match name.trim() {
                "abrupt" => CloseKind::Abrupt,
                code => {
                    let code: u16 = code.parse().map_err(|_| syntax())?;
                    if !sendable(code) {
                        return Err(CloseMixError::Code(code));
                    }
                    CloseKind::Code(code)
                }
            };
            if entries.iter().any(|(k, _)| *k == kind) {
                return Err(CloseMixError::Duplicate(kind.to_string()));
            }
            entries.push((kind, weight));
        }
        if entries.iter().all(|(_, w)| *w == 0) {
            return Err(CloseMixError::Empty);
        }
        Ok(CloseMix { entries })
    }
}

impl fmt::Display for CloseMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (kind, weight)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{kind}={weight}")?;
        }
        Ok(())
    }
}

impl CloseMix {
    /// How many of `n` sessions get each kind: proportional to the weights,
    /// rounded by largest remainder (ties to the kind listed first), so the
    /// counts always add up to `n`.
    pub fn counts(&self, n: usize) -> Vec<(CloseKind, usize)> {
        let total: u64 = self.entries.iter().map(|(_, w)| u64::from(*w)).sum();
        let n64 = n as u64;
        let mut counts: Vec<(CloseKind, usize)> = Vec::with_capacity(self.entries.len());
        let mut remainders: Vec<(u64, usize)> = Vec::with_capacity(self.entries.len());
        let mut assigned = 0usize;
        for (i, (kind, weight)) in self.entries.iter().enumerate() {
            let share = n64 * u64::from(*weight);
            let floor = (share / total) as usize;
            counts.push((*kind, floor));
            remainders.push((share % total, i));
            assigned += floor;
        }
        // Larger remainder first; among equals, the earlier entry.
        remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, i) in remainders.into_iter().take(n - assigned) {
            counts[i].1 += 1;
        }
        counts
    }

    /// One close kind per session, with [`Self::counts`] of each, spread
    /// evenly (smooth weighted round-robin) so that the sessions that end
    /// first already show the mix.
    pub fn assign(&self, n: usize) -> Vec<CloseKind> {
        let counts = self.counts(n);
        let mut credit = vec![0i64; counts.len()];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut best = 0;
            for (i, (_, count)) in counts.iter().enumerate() {
                credit[i] += *count as i64;
                if credit[i] > credit[best] {
                    best = i;
                }
            }
            credit[best] -= n as i64;
            out.push(counts[best].0);
        }
        out
    }
}

/// What a session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionClass {
    /// Sends events.
    Publisher,
    /// Connects with `?subscribe=1` and only receives.
    Subscriber,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPlan {
    pub index: usize,
    pub class: SessionClass,
    pub close: CloseKind,
}

/// How many of `sessions` are subscribers for a share in [0, 1] (rounded to
/// the nearest session).
pub fn subscriber_count(sessions: usize, share: f64) -> usize {
    ((sessions as f64 * share.clamp(0.0, 1.0)).round() as usize).min(sessions)
}

/// Subscribers first (they must be listening before anyone publishes), then
/// publishers; each class gets the close mix on its own, so that both end
/// in the stated proportions.
pub fn plan_sessions(sessions: usize, subscriber_share: f64, mix: &CloseMix) -> Vec<SessionPlan> {
    let subscribers = subscriber_count(sessions, subscriber_share);
    let classes = [
        (SessionClass::Subscriber, subscribers),
        (SessionClass::Publisher, sessions - subscribers),
    ];
    let mut plan = Vec::with_capacity(sessions);
    for (class, n) in classes {
        for close in mix.assign(n) {
            plan.push(SessionPlan {
                index: plan.len(),
                class,
                close,
            });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(s: &str) -> CloseMix {
        s.parse().expect("valid mix")
    }

    #[test]
    fn parses_and_prints_a_mix() {
        let m = mix("1000=2, 1001=1,abrupt=1");
        assert_eq!(m.to_string(), "1000=2,1001=1,abrupt=1");
    }

    #[test]
    fn rejects_bad_mixes() {
        assert!(matches!(
            "1000".parse::<CloseMix>(),
            Err(CloseMixError::Syntax(_))
        ));
        assert!(matches!(
            "x=1".parse::<CloseMix>(),
            Err(CloseMixError::Syntax(_))
        ));
        assert_eq!("1006=1".parse::<CloseMix>(), Err(CloseMixError::Code(1006)));
        assert_eq!("1005=1".parse::<CloseMix>(), Err(CloseMixError::Code(1005)));
        assert!(matches!(
            "1000=1,1000=2".parse::<CloseMix>(),
            Err(CloseMixError::Duplicate(_))
        ));
        assert_eq!("1000=0".parse::<CloseMix>(), Err(CloseMixError::Empty));
        assert_eq!("".parse::<CloseMix>(), Err(CloseMixError::Empty));
        assert!("4000=1".parse::<CloseMix>().is_ok());
    }

    #[test]
    fn counts_are_proportional_and_add_up() {
        let m = mix("1000=2,1001=1,abrupt=1");
        assert_eq!(
            m.counts(8),
            vec![
                (CloseKind::Code(1000), 4),
                (CloseKind::Code(1001), 2),
                (CloseKind::Abrupt, 2)
            ]
        );
        // 7 × (1/2, 1/4, 1/4) = 3.5, 1.75, 1.75: the two largest remainders
        // (0.75, 0.75) win over 0.5.
        assert_eq!(
            m.counts(7),
            vec![
                (CloseKind::Code(1000), 3),
                (CloseKind::Code(1001), 2),
                (CloseKind::Abrupt, 2)
            ]
        );
        for n in 0..50 {
            let total: usize = m.counts(n).iter().map(|(_, c)| c).sum();
            assert_eq!(total, n);
        }
        // Equal remainders go to the first listed.
        assert_eq!(
            mix("abrupt=1,1000=1").counts(1),
            vec![(CloseKind::Abrupt, 1), (CloseKind::Code(1000), 0)]
        );
        assert_eq!(mix("1000=1,abrupt=0").counts(5)[1], (CloseKind::Abrupt, 0));
    }

    #[test]
    fn assignment_matches_the_counts_and_interleaves() {
        let m = mix("1000=2,1001=1,abrupt=1");
        for n in 0..40 {
            let assigned = m.assign(n);
            assert_eq!(assigned.len(), n);
            for (kind, count) in m.counts(n) {
                assert_eq!(
                    assigned.iter().filter(|k| **k == kind).count(),
                    count,
                    "n={n}"
                );
            }
        }
        assert_eq!(
            m.assign(4),
            vec![
                CloseKind::Code(1000),
                CloseKind::Code(1001),
                CloseKind::Abrupt,
                CloseKind::Code(1000)
            ]
        );
    }

    #[test]
    fn sessions_are_planned_per_class() {
        let plan = plan_sessions(10, 0.3, &mix("1000=1,abrupt=1"));
        assert_eq!(plan.len(), 10);
        assert!(plan.iter().enumerate().all(|(i, p)| p.index == i));
        let subs: Vec<_> = plan
            .iter()
            .filter(|p| p.class == SessionClass::Subscriber)
            .collect();
        assert_eq!(subs.len(), 3);
        assert!(
            plan[..3]
                .iter()
                .all(|p| p.class == SessionClass::Subscriber)
        );
        let pub_abrupt = plan
            .iter()
            .filter(|p| p.class == SessionClass::Publisher && p.close == CloseKind::Abrupt)
            .count();
        // 7 publishers: 3.5 each, and the tied remainder goes to 1000, listed first.
        assert_eq!(pub_abrupt, 3);
        assert_eq!(subscriber_count(3, 0.5), 2);
        assert_eq!(subscriber_count(3, 2.0), 3);
        assert_eq!(subscriber_count(3, -1.0), 0);
    }
}
