//! The UDP ports peers may bind: any (port 0) or a configured range published for NAT/Docker.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

/// Hands out ports from an optional range; a lease returns its port when dropped.
#[derive(Debug)]
pub struct PortPool {
    range: Option<RangeInclusive<u16>>,
    in_use: Mutex<BTreeSet<u16>>,
}

/// A port reserved for one peer (0 = let the OS choose).
#[derive(Debug)]
pub struct PortLease {
    pub port: u16,
    pool: Option<Arc<PortPool>>,
}

impl PortPool {
    pub fn new(range: Option<RangeInclusive<u16>>) -> Arc<Self> {
        Arc::new(Self {
            range,
            in_use: Mutex::new(BTreeSet::new()),
        })
    }

    /// How many distinct ports a peer may try (1 when the OS chooses).
    pub fn attempts(&self) -> usize {
        self.range.as_ref().map_or(1, |r| r.clone().count())
    }

    /// Reserves the lowest free port of the range, skipping `avoid` (ports that failed to bind).
    pub fn lease(self: &Arc<Self>, avoid: &BTreeSet<u16>) -> Option<PortLease> {
        let Some(range) = &self.range else {
            return Some(PortLease {
                port: 0,
                pool: None,
            });
        };
        let mut in_use = self
            .in_use
            .lock()
            .expect("port pool lock is never held across a panic");
        let port = range
            .clone()
            .find(|p| !in_use.contains(p) && !avoid.contains(p))?;
        in_use.insert(port);
        Some(PortLease {
            port,
            pool: Some(self.clone()),
        })
    }

    pub fn leased(&self) -> usize {
        self.in_use.lock().map(|s| s.len()).unwrap_or(0)
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool
            && let Ok(mut in_use) = pool.in_use.lock()
        {
            in_use.remove(&self.port);
        }
    }
}

/// Parses `40000-40100` (or a single port) into a range.
pub fn parse_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let parse = |s: &str| {
        s.trim()
            .parse::<u16>()
            .map_err(|e| format!("bad port {s:?} in {text:?}: {e}"))
    };
    let (low, high) = (parse(low)?, parse(high)?);
    if low == 0 || low > high {
        return Err(format!(
            "port range {text:?} must be LOW-HIGH with 0 < LOW <= HIGH"
        ));
    }
    Ok(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_unique_and_returned_on_drop() {
        let pool = PortPool::new(Some(5000..=5001));
        let none = BTreeSet::new();
        let a = pool.lease(&none).unwrap();
        let b = pool.lease(&none).unwrap();
        assert_ne!(a.port, b.port);
        assert!(pool.lease(&none).is_none());
        drop(a);
        assert_eq!(pool.lease(&none).unwrap().port, 5000);
    }

    #[test]
    fn failed_ports_are_avoided() {
        let pool = PortPool::new(Some(5000..=5002));
        let avoid = BTreeSet::from([5000]);
        assert_eq!(pool.lease(&avoid).unwrap().port, 5001);
    }

    #[test]
    fn without_a_range_the_os_chooses() {
        let pool = PortPool::new(None);
        assert_eq!(pool.lease(&BTreeSet::new()).unwrap().port, 0);
        assert_eq!(pool.attempts(), 1);
    }

    #[test]
    fn ranges_parse_and_bad_ones_are_explained() {
        assert_eq!(parse_range("40000-40010").unwrap(), 40000..=40010);
        assert_eq!(parse_range("5000").unwrap(), 5000..=5000);
        assert!(parse_range("10-5").unwrap_err().contains("LOW-HIGH"));
        assert!(parse_range("a-5").is_err());
    }
}
