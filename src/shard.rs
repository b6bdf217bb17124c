//! Sharding (`envctl run --shard`): which replica writes which environment. Pure: the
//! member list comes from `controller::shard` (member Leases), the time is passed in.
//!
//! Environments are assigned by rendezvous (highest-random-weight) hashing of the
//! environment's name over the live members: when a member joins or leaves, only the
//! environments it gains or loses move. A replica may write an environment only when it
//! owns it now and, for the whole last lease duration, every member set it saw gave the
//! environment either to itself or to a member that has since gone (a member whose Lease
//! lapsed stopped writing before it lapsed: it fences itself when it cannot renew). So a
//! join waits one lease duration (the previous owner sees the join within one renewal and
//! stops), a lapse or a release is taken over at once, and a replica that just started, or
//! whose own view is stale, writes nothing until its view has held for a lease duration.
//!
//! Owns nothing but that decision; never reads the cluster or the clock.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::vocab::Fnv64;

/// The weight of `member` for `environment` (FNV-1a, then a 64-bit finalizer so that
/// similar names spread).
fn weight(member: &str, environment: &str) -> u64 {
    let mut h = Fnv64::new();
    h.write(member.as_bytes());
    h.write(&[0]);
    h.write(environment.as_bytes());
    h.mixed()
}

/// The member that owns `environment` among `members` (highest weight; ties by name).
pub fn owner<'a, I>(environment: &str, members: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a String>,
{
    members
        .into_iter()
        .map(|m| (weight(m, environment), m.as_str()))
        .max()
        .map(|(_, m)| m)
}

/// One member set as this replica saw it: `None` when unknown (before the first list, or
/// while this replica's own Lease or view is stale).
#[derive(Debug, Clone)]
struct View {
    members: Option<BTreeSet<String>>,
    /// When this view stopped being current (`None`: it is current).
    until: Option<Instant>,
}

/// This replica's record of the member sets it saw within the last lease duration.
#[derive(Debug, Clone)]
pub struct Membership {
    me: String,
    lease: Duration,
    views: VecDeque<View>,
}

impl Membership {
    /// Starts with an unknown view: nothing is writable for the first lease duration.
    pub fn new(me: &str, lease: Duration) -> Membership {
        Membership {
            me: me.to_string(),
            lease,
            views: VecDeque::from([View {
                members: None,
                until: None,
            }]),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// The current member set, if known.
    pub fn members(&self) -> Option<&BTreeSet<String>> {
        self.views.back().and_then(|v| v.members.as_ref())
    }

    /// Records the member set seen at `now` (`None`: unknown, e.g. this replica could not
    /// renew its own Lease in time). Returns whether it differs from the current one.
    pub fn observe(&mut self, members: Option<BTreeSet<String>>, now: Instant) -> bool {
        let members = members.filter(|m| m.contains(&self.me));
        if self.views.back().map(|v| &v.members) == Some(&members) {
            self.forget(now);
            return false;
        }
        if let Some(current) = self.views.back_mut() {
            current.until = Some(now);
        }
        self.views.push_back(View {
            members,
            until: None,
        });
        self.forget(now);
        true
    }

    /// Drops views that ended more than a lease duration ago.
    fn forget(&mut self, now: Instant) {
        while self
            .views
            .front()
            .and_then(|v| v.until)
            .is_some_and(|until| until + self.lease <= now)
        {
            self.views.pop_front();
        }
    }

    /// The environments this replica owns by hash now (whether or not yet writable).
    pub fn owns(&self, environment: &str) -> bool {
        self.members()
            .and_then(|m| owner(environment, m))
            .is_some_and(|o| o == self.me)
    }

    /// What may be written at `now`, frozen for one pass.
    pub fn writable(&self, now: Instant) -> Writable {
        let current = self.members().cloned();
        let earlier = self
            .views
            .iter()
            .rev()
            .skip(1)
            .filter(|v| v.until.is_some_and(|u| u + self.lease > now))
            .map(|v| v.members.clone())
            .collect();
        Writable {
            me: self.me.clone(),
            current,
            earlier,
        }
    }

    /// When the set of writable environments next changes without a new observation (an
    /// earlier view leaves the window), if after `now`.
    pub fn settles_at(&self, now: Instant) -> Option<Instant> {
        self.views
            .iter()
            .filter_map(|v| v.until)
            .map(|u| u + self.lease)
            .filter(|t| *t > now)
            .min()
    }
}

/// Which environments this replica may write in one pass (see the module comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writable {
    me: String,
    current: Option<BTreeSet<String>>,
    /// Every other member set current within the last lease duration, newest first.
    earlier: Vec<Option<BTreeSet<String>>>,
}

impl Writable {
    pub fn may_write(&self, environment: &str) -> bool {
        let Some(current) = &self.current else {
            return false;
        };
        if owner(environment, current) != Some(self.me.as_str()) {
            return false;
        }
        self.earlier.iter().all(|view| {
            let Some(members) = view else {
                return false; // unknown then: someone else may have written
            };
            match owner(environment, members) {
                Some(o) => o == self.me || !current.contains(o),
                None => true,
            }
        })
    }

    /// The current member set (empty when unknown).
    pub fn members(&self) -> Vec<String> {
        self.current
            .as_ref()
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> Option<BTreeSet<String>> {
        Some(names.iter().map(|s| s.to_string()).collect())
    }

    fn envs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("env-{i}")).collect()
    }

    #[test]
    fn rendezvous_spreads_and_moves_only_what_it_must() {
        let three: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let fleet = envs(3000);
        let mut counts = std::collections::BTreeMap::new();
        for e in &fleet {
            *counts.entry(owner(e, &three).unwrap_or("")).or_insert(0) += 1;
        }
        for (m, n) in &counts {
            assert!((800..1200).contains(n), "{m} owns {n} of 3000: {counts:?}");
        }
        // c leaves: only c's environments move.
        let two = &three[..2];
        for e in &fleet {
            let before = owner(e, &three);
            let after = owner(e, two);
            if before != Some("c") {
                assert_eq!(before, after, "{e} moved though its owner stayed");
            }
        }
    }

    #[test]
    fn a_new_replica_writes_nothing_for_a_lease_duration() {
        let lease = Duration::from_secs(15);
        let t0 = Instant::now();
        let mut m = Membership::new("a", lease);
        assert!(m.observe(set(&["a"]), t0));
        let fleet = envs(20);
        assert!(fleet.iter().all(|e| m.owns(e)));
        assert!(!fleet.iter().any(|e| m.writable(t0).may_write(e)));
        assert_eq!(m.settles_at(t0), Some(t0 + lease));
        assert_eq!(m.settles_at(t0 + lease), None);
        assert!(!m.observe(set(&["a"]), t0 + lease));
        assert!(fleet.iter().all(|e| m.writable(t0 + lease).may_write(e)));
    }

    #[test]
    fn a_join_waits_a_lease_and_a_lapse_is_taken_at_once() {
        let lease = Duration::from_secs(15);
        let t0 = Instant::now();
        let fleet = envs(200);
        let mut a = Membership::new("a", lease);
        a.observe(set(&["a", "b"]), t0);
        let t1 = t0 + lease;
        a.observe(set(&["a", "b"]), t1);
        let before: Vec<bool> = fleet.iter().map(|e| a.writable(t1).may_write(e)).collect();
        assert!(before.iter().any(|w| *w) && !before.iter().all(|w| *w));
        // c joins: a keeps writing what stays its own, and what moves to c is no longer a's.
        let t2 = t1 + Duration::from_secs(1);
        a.observe(set(&["a", "b", "c"]), t2);
        let w = a.writable(t2);
        for (e, was) in fleet.iter().zip(&before) {
            assert_eq!(
                w.may_write(e),
                *was && owner(e, &set(&["a", "b", "c"]).unwrap_or_default()) == Some("a")
            );
        }
        // From c's side: it writes nothing until the join has held for a lease duration.
        let mut c = Membership::new("c", lease);
        c.observe(set(&["a", "b", "c"]), t2);
        assert!(!fleet.iter().any(|e| c.writable(t2).may_write(e)));
        assert!(fleet.iter().any(|e| c.writable(t2 + lease).may_write(e)));
        // b's Lease lapses: a takes b's environments at once (b fenced itself).
        let t3 = t2 + lease;
        a.observe(set(&["a", "b", "c"]), t3);
        let t4 = t3 + Duration::from_secs(1);
        a.observe(set(&["a", "c"]), t4);
        let w = a.writable(t4);
        let ac = set(&["a", "c"]).unwrap_or_default();
        for e in &fleet {
            assert_eq!(w.may_write(e), owner(e, &ac) == Some("a"), "{e}");
        }
    }

    #[test]
    fn an_unknown_view_stops_every_write_for_a_lease_duration() {
        let lease = Duration::from_secs(15);
        let t0 = Instant::now();
        let mut a = Membership::new("a", lease);
        a.observe(set(&["a"]), t0);
        let t1 = t0 + lease;
        assert!(a.writable(t1).may_write("x"));
        a.observe(None, t1);
        assert!(!a.writable(t1).may_write("x"));
        // A member set without this replica is as good as unknown.
        a.observe(set(&["b"]), t1 + Duration::from_secs(1));
        assert!(!a.writable(t1 + Duration::from_secs(1)).may_write("x"));
        let t2 = t1 + Duration::from_secs(2);
        a.observe(set(&["a"]), t2);
        assert!(!a.writable(t2).may_write("x"));
        assert!(a.writable(t2 + lease).may_write("x"));
    }
}
