//! A cap on the distinct query templates each process reports, so that the
//! `query` label's cardinality stays bounded whatever the application sends
//! (ad-hoc SQL, generated identifiers, a template per tenant schema). The
//! first [`DEFAULT_TEMPLATE_CAP`] templates a process sends keep their name;
//! any other is reported as [`OTHER`], and counted.

#![cfg_attr(
    not(test),
    expect(dead_code, reason = "wired to the payload capture path next")
)]

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    sync::Arc,
};

/// Distinct templates per process (the brief's default).
pub const DEFAULT_TEMPLATE_CAP: usize = 500;
/// The label value of templates past the cap.
pub const OTHER: &str = "other";

/// The templates admitted for one process.
#[derive(Debug)]
pub struct TemplateCap {
    cap: usize,
    admitted: HashSet<Arc<str>>,
    other: Arc<str>,
    overflowed: u64,
}

impl TemplateCap {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            admitted: HashSet::new(),
            other: Arc::from(OTHER),
            overflowed: 0,
        }
    }

    /// The label value `template` is reported under: itself while the cap
    /// allows, [`OTHER`] once it is reached.
    pub fn admit(&mut self, template: &Arc<str>) -> Arc<str> {
        if self.admitted.contains(template) {
            return template.clone();
        }
        if self.admitted.len() < self.cap {
            self.admitted.insert(template.clone());
            return template.clone();
        }
        self.overflowed += 1;
        self.other.clone()
    }

    /// Distinct templates admitted.
    pub fn len(&self) -> usize {
        self.admitted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }

    /// Statements reported as [`OTHER`].
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }
}

/// One [`TemplateCap`] per process (keyed by whatever identifies a process
/// in the labels: its name, its tgid).
#[derive(Debug)]
pub struct ProcessTemplates<K> {
    cap: usize,
    processes: HashMap<K, TemplateCap>,
}

impl<K: Eq + Hash> ProcessTemplates<K> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            processes: HashMap::new(),
        }
    }

    pub fn admit(&mut self, process: K, template: &Arc<str>) -> Arc<str> {
        let cap = self.cap;
        self.processes
            .entry(process)
            .or_insert_with(|| TemplateCap::new(cap))
            .admit(template)
    }

    pub fn get(&self, process: &K) -> Option<&TemplateCap> {
        self.processes.get(process)
    }

    /// Forgets a process that exited.
    pub fn remove(&mut self, process: &K) {
        self.processes.remove(process);
    }
}

impl<K: Eq + Hash> Default for ProcessTemplates<K> {
    fn default() -> Self {
        Self::new(DEFAULT_TEMPLATE_CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_past_the_cap_are_other_and_known_ones_stay() {
        let mut caps = ProcessTemplates::new(3);
        assert!(TemplateCap::new(3).is_empty());
        let t = |i: usize| -> Arc<str> { format!("SELECT c{i} FROM t WHERE id = ?").into() };
        for i in 0..3 {
            assert_eq!(caps.admit("app", &t(i)), t(i));
        }
        assert_eq!(&*caps.admit("app", &t(3)), OTHER);
        assert_eq!(&*caps.admit("app", &t(4)), OTHER);
        assert_eq!(
            caps.admit("app", &t(1)),
            t(1),
            "admitted before the cap: kept"
        );
        assert_eq!(caps.admit("worker", &t(3)), t(3), "the cap is per process");
        let app = caps.get(&"app").expect("app seen");
        assert_eq!((app.len(), app.overflowed()), (3, 2));
        caps.remove(&"app");
        assert!(caps.get(&"app").is_none());
    }

    #[test]
    fn default_cap_is_500() {
        let mut caps = ProcessTemplates::default();
        for i in 0..600 {
            caps.admit(1u32, &Arc::from(format!("SELECT {i}")));
        }
        let cap = caps.get(&1).expect("seen");
        assert_eq!((cap.len(), cap.overflowed()), (DEFAULT_TEMPLATE_CAP, 100));
    }
}
