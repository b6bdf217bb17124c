//! Rollout: which environments get a new revision now, and which keep the one they run, under
//! a `RolloutPolicy` (waves, as Argo CD's RollingSync; each wave waits for the one before it
//! to be Ready, as Flux's dependsOn). Also the rollout's status.
//!
//! Pure: decides from the policy, where each environment stands and its health. Reading
//! revisions and health is the controller's; rendering the held environments from their
//! previous revision is the pass's.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::health::{Health, HealthState};
use crate::manifest::RolloutPolicy;

/// Where one environment stands against the revision being rolled out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Not deployed yet: it serves nobody, so it is created at once (and counts in its wave).
    New,
    /// Runs the revision's manifest already (applied at it, or unchanged by it).
    AtTarget,
    /// Runs an older manifest that the revision changes.
    Behind,
}

/// One environment of the fleet.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub position: Position,
}

/// What the rollout lets the pass do.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    /// Environments rendered from the new revision (admitted now or earlier, and new ones).
    pub admitted: BTreeSet<String>,
    /// Environments that keep their previous revision for now.
    pub held: BTreeSet<String>,
    pub status: RolloutStatus,
}

/// The rollout as `envctl status` and the metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RolloutStatus {
    pub revision: String,
    /// The policy's name.
    pub policy: String,
    /// The wave now rolling out (1-based); `None` when the rollout is complete.
    pub current_wave: Option<usize>,
    pub waves: Vec<WaveStatus>,
    /// Environments at the revision and Ready.
    pub done: usize,
    /// Environments given the revision, not Ready yet.
    pub in_flight: usize,
    /// Environments still on their previous revision.
    pub waiting: usize,
    /// Set when a Degraded environment stopped the rollout.
    pub halted: Option<Halt>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WaveStatus {
    pub name: String,
    pub environments: usize,
    pub done: usize,
    pub in_flight: usize,
    pub waiting: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Halt {
    pub environment: String,
    pub reason: String,
    pub message: String,
}

impl RolloutStatus {
    /// One line for logs and `envctl status`.
    pub fn summary(&self) -> String {
        let short: String = self.revision.chars().take(12).collect();
        let state = match (&self.halted, self.current_wave) {
            (Some(h), _) => format!("HALTED by {} ({}: {})", h.environment, h.reason, h.message),
            (None, Some(w)) => format!(
                "wave {w} of {} ({})",
                self.waves.len(),
                self.waves.get(w - 1).map_or("", |w| w.name.as_str())
            ),
            (None, None) => "complete".to_string(),
        };
        format!(
            "rollout of {short} under policy {}: {state}; {} done, {} in flight, {} waiting",
            self.policy, self.done, self.in_flight, self.waiting
        )
    }
}

/// Decides which environments roll out now. Waves are taken in order: a wave starts only
/// when every environment of the waves before it is at the revision and Ready; within the
/// current wave at most `maxInFlight` environments are at the revision and not Ready. A
/// `Degraded` environment at the revision halts everything not yet admitted.
pub fn decide(
    policy: &RolloutPolicy,
    revision: &str,
    members: &[Member<'_>],
    health: &BTreeMap<String, Health>,
) -> Decision {
    let waves = &policy.spec.waves;
    // Each environment's wave: the first that selects it, else the implicit last one.
    let mut by_wave: Vec<Vec<&Member<'_>>> = vec![Vec::new(); waves.len() + 1];
    for m in members {
        let i = waves
            .iter()
            .position(|w| w.selector.matches(m.labels))
            .unwrap_or(waves.len());
        by_wave[i].push(m);
    }
    for w in &mut by_wave {
        w.sort_by(|a, b| a.name.cmp(b.name));
    }
    let state_of = |name: &str| health.get(name).map_or(HealthState::Unknown, |h| h.state);
    let at_target = |m: &Member<'_>| m.position != Position::Behind;
    let halted = by_wave.iter().flatten().find_map(|m| {
        let h = health.get(m.name)?;
        (at_target(m) && h.state == HealthState::Degraded).then(|| Halt {
            environment: m.name.to_string(),
            reason: h.reason.clone(),
            message: h.message.clone(),
        })
    });
    let mut decision = Decision {
        status: RolloutStatus {
            revision: revision.to_string(),
            policy: policy.metadata.name.clone(),
            halted: halted.clone(),
            ..RolloutStatus::default()
        },
        ..Decision::default()
    };
    // Whether every wave so far is complete (so the next one may start).
    let mut open = true;
    for (i, wave) in by_wave.iter().enumerate() {
        if i == waves.len() && wave.is_empty() {
            break; // no implicit last wave
        }
        let name = waves
            .get(i)
            .and_then(|w| w.name.clone())
            .unwrap_or_else(|| {
                if i == waves.len() {
                    "unselected".to_string()
                } else {
                    format!("wave-{}", i + 1)
                }
            });
        let mut in_flight = wave
            .iter()
            .filter(|m| at_target(m) && state_of(m.name) != HealthState::Ready)
            .count();
        let limit = waves
            .get(i)
            .and_then(|w| w.max_in_flight.as_ref())
            .map_or(wave.len().max(1), |m| m.resolve(wave.len()));
        let active = open && halted.is_none();
        for m in wave {
            let admit = match m.position {
                Position::New | Position::AtTarget => true,
                Position::Behind if active && in_flight < limit => {
                    in_flight += 1;
                    true
                }
                Position::Behind => false,
            };
            if admit {
                decision.admitted.insert(m.name.to_string());
            } else {
                decision.held.insert(m.name.to_string());
            }
        }
        let done = wave
            .iter()
            .filter(|m| at_target(m) && state_of(m.name) == HealthState::Ready)
            .count();
        let waiting = wave
            .iter()
            .filter(|m| decision.held.contains(m.name))
            .count();
        let complete = done == wave.len();
        if open && !complete && decision.status.current_wave.is_none() {
            decision.status.current_wave = Some(i + 1);
        }
        open = open && complete;
        decision.status.done += done;
        decision.status.waiting += waiting;
        decision.status.in_flight += wave.len() - done - waiting;
        decision.status.waves.push(WaveStatus {
            name,
            environments: wave.len(),
            done,
            in_flight: wave.len() - done - waiting,
            waiting,
        });
    }
    decision
}

/// The decision when the policy cannot be followed (invalid, or more than one): every
/// change to what runs is held, new and unchanged environments go ahead, and the rollout is
/// halted with `reason`.
pub fn hold_all(revision: &str, members: &[Member<'_>], reason: &str) -> Decision {
    let mut d = Decision::default();
    for m in members {
        if m.position == Position::Behind {
            d.held.insert(m.name.to_string());
        } else {
            d.admitted.insert(m.name.to_string());
        }
    }
    d.status = RolloutStatus {
        revision: revision.to_string(),
        policy: "(invalid)".into(),
        current_wave: Some(1),
        waiting: d.held.len(),
        halted: Some(Halt {
            environment: "-".into(),
            reason: "InvalidPolicy".into(),
            message: reason.to_string(),
        }),
        ..RolloutStatus::default()
    };
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RolloutPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "envctl.materialize.cloud/v1alpha1",
            "kind": "RolloutPolicy",
            "metadata": {"name": "fleet"},
            "spec": {"waves": [
                {"name": "canary", "selector": {"matchLabels": {"wave": "1"}}},
                {"selector": {"matchLabels": {"wave": "2"}}, "maxInFlight": 1},
                {"selector": {"matchLabels": {"wave": "3"}}, "maxInFlight": "50%"}
            ]}
        }))
        .expect("a policy")
    }

    struct Fleet {
        labels: Vec<(String, BTreeMap<String, String>)>,
    }

    impl Fleet {
        fn new(spec: &[(&str, &str)]) -> Fleet {
            Fleet {
                labels: spec
                    .iter()
                    .map(|(n, w)| {
                        (
                            n.to_string(),
                            BTreeMap::from([("wave".to_string(), w.to_string())]),
                        )
                    })
                    .collect(),
            }
        }
        fn members(&self, at: &[&str]) -> Vec<Member<'_>> {
            self.labels
                .iter()
                .map(|(n, l)| Member {
                    name: n,
                    labels: l,
                    position: if at.contains(&n.as_str()) {
                        Position::AtTarget
                    } else {
                        Position::Behind
                    },
                })
                .collect()
        }
    }

    fn health(states: &[(&str, HealthState)]) -> BTreeMap<String, Health> {
        states
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    Health {
                        state: *s,
                        reason: "R".into(),
                        message: "m".into(),
                    },
                )
            })
            .collect()
    }

    fn names(s: &BTreeSet<String>) -> Vec<&str> {
        s.iter().map(String::as_str).collect()
    }

    #[test]
    fn waves_start_in_order_and_respect_max_in_flight() {
        use HealthState::*;
        let fleet = Fleet::new(&[
            ("a1", "1"),
            ("b1", "2"),
            ("b2", "2"),
            ("c1", "3"),
            ("c2", "3"),
            ("c3", "3"),
            ("x", "none"),
        ]);
        // Nothing at the revision yet: only wave 1 starts.
        let d = decide(&policy(), "r2", &fleet.members(&[]), &BTreeMap::new());
        assert_eq!(names(&d.admitted), ["a1"]);
        assert_eq!(d.status.current_wave, Some(1));
        assert_eq!(
            d.status.waves.len(),
            4,
            "the unselected environment is a wave"
        );
        // a1 at the revision but not Ready: still wave 1.
        let d = decide(
            &policy(),
            "r2",
            &fleet.members(&["a1"]),
            &health(&[("a1", Progressing)]),
        );
        assert_eq!(names(&d.admitted), ["a1"]);
        // a1 Ready: wave 2 starts, one at a time.
        let d = decide(
            &policy(),
            "r2",
            &fleet.members(&["a1"]),
            &health(&[("a1", Ready)]),
        );
        assert_eq!(names(&d.admitted), ["a1", "b1"]);
        assert_eq!(d.status.current_wave, Some(2));
        let d = decide(
            &policy(),
            "r2",
            &fleet.members(&["a1", "b1"]),
            &health(&[("a1", Ready), ("b1", Ready)]),
        );
        assert_eq!(names(&d.admitted), ["a1", "b1", "b2"]);
        // Wave 3 at 50% of 3: 2 at once.
        let d = decide(
            &policy(),
            "r2",
            &fleet.members(&["a1", "b1", "b2"]),
            &health(&[("a1", Ready), ("b1", Ready), ("b2", Ready)]),
        );
        assert_eq!(names(&d.admitted), ["a1", "b1", "b2", "c1", "c2"]);
        assert_eq!(d.status.current_wave, Some(3));
        let all = ["a1", "b1", "b2", "c1", "c2", "c3", "x"];
        let ready: Vec<(&str, HealthState)> = all.iter().map(|n| (*n, Ready)).collect();
        let d = decide(&policy(), "r2", &fleet.members(&all), &health(&ready));
        assert_eq!(d.status.current_wave, None);
        assert_eq!((d.status.done, d.status.waiting), (7, 0));
        assert!(d.status.summary().contains("complete"));
    }

    #[test]
    fn a_degraded_environment_halts_what_is_not_admitted() {
        use HealthState::*;
        let fleet = Fleet::new(&[("a1", "1"), ("a2", "1"), ("b1", "2"), ("c1", "3")]);
        let d = decide(
            &policy(),
            "r2",
            &fleet.members(&["a1", "a2"]),
            &health(&[("a1", Degraded), ("a2", Ready)]),
        );
        assert_eq!(names(&d.admitted), ["a1", "a2"]);
        assert_eq!(names(&d.held), ["b1", "c1"]);
        let halt = d.status.halted.clone().expect("halted");
        assert_eq!(halt.environment, "a1");
        assert!(d.status.summary().contains("HALTED by a1"));
        // A fix (a newer revision) puts a1 behind again: wave 1 rolls forward first.
        let d = decide(
            &policy(),
            "r3",
            &fleet.members(&[]),
            &health(&[("a1", Degraded), ("a2", Ready)]),
        );
        assert!(d.status.halted.is_none());
        assert_eq!(names(&d.admitted), ["a1", "a2"]);
        assert_eq!(names(&d.held), ["b1", "c1"]);
    }

    #[test]
    fn an_invalid_policy_holds_every_change_to_what_runs() {
        let fleet = Fleet::new(&[("a1", "1"), ("b1", "2"), ("c1", "3")]);
        let mut members = fleet.members(&["b1"]);
        members[2].position = Position::New;
        let d = hold_all("r2", &members, "two RolloutPolicy documents");
        assert_eq!(names(&d.held), ["a1"]);
        assert_eq!(names(&d.admitted), ["b1", "c1"]);
        let halt = d.status.halted.expect("halted");
        assert_eq!(halt.reason, "InvalidPolicy");
    }

    #[test]
    fn new_environments_are_created_at_once() {
        let fleet = Fleet::new(&[("a1", "1"), ("c1", "3")]);
        let mut members = fleet.members(&[]);
        members[1].position = Position::New;
        let d = decide(&policy(), "r2", &members, &BTreeMap::new());
        assert_eq!(names(&d.admitted), ["a1", "c1"]);
    }
}
