//! Health: whether each environment works, computed the way kstatus computes a StatefulSet's
//! status, then refined by its pods (unschedulable, image failures, crash loops, readiness).
//!
//! Pure: takes the observed StatefulSets and pods and the time, returns one `Health` per
//! environment. No I/O and no clock (the caller passes `now`); reading the objects is
//! `observe`'s, publishing the result is `status`'s and the controller's.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::vocab::HASH_ANNOTATION;

/// An environment's health, the four kstatus-like states.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    prometheus_client::encoding::EncodeLabelValue,
)]
pub enum HealthState {
    /// Every StatefulSet is at its newest revision with all replicas ready.
    Ready,
    /// A rollout is under way (or waits for a node) and its deadline has not passed.
    Progressing,
    /// Failed: an image that cannot be had, a crash loop, or no progress past the deadline.
    Degraded,
    /// Not observed: the environment has no StatefulSet yet, or nothing was read.
    Unknown,
}

impl HealthState {
    pub const ALL: [HealthState; 4] = [
        HealthState::Ready,
        HealthState::Progressing,
        HealthState::Degraded,
        HealthState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Ready => "Ready",
            HealthState::Progressing => "Progressing",
            HealthState::Degraded => "Degraded",
            HealthState::Unknown => "Unknown",
        }
    }
}

impl std::fmt::Display for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One environment's health with a one-word reason and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub state: HealthState,
    /// CamelCase, as Kubernetes reasons are: `AllReady`, `Unschedulable`, `ImagePull`...
    pub reason: String,
    pub message: String,
}

impl Health {
    fn new(state: HealthState, reason: &str, message: impl Into<String>) -> Health {
        Health {
            state,
            reason: reason.to_string(),
            message: message.into(),
        }
    }

    pub fn unknown(message: impl Into<String>) -> Health {
        Health::new(HealthState::Unknown, "NotObserved", message)
    }
}

/// What health reads of a StatefulSet. The controller's watch keeps this instead of the
/// typed object, which is about 1.8 KiB however much of it is dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatefulSetView {
    pub name: String,
    /// Its desired-hash (`HASH_ANNOTATION`): which version of its desired state it shows.
    pub hash: Option<String>,
    pub generation: i64,
    /// `spec.replicas` (1 when unset).
    pub replicas: i32,
    /// `spec.updateStrategy.rollingUpdate.partition` (0 when unset).
    pub partition: i32,
    /// The status counters, if it has a status.
    pub status: Option<StatefulSetCounts>,
}

/// A StatefulSet's status, as health reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatefulSetCounts {
    pub observed_generation: i64,
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    pub current: i32,
    pub current_revision: Option<String>,
    pub update_revision: Option<String>,
}

impl From<&StatefulSet> for StatefulSetView {
    fn from(sts: &StatefulSet) -> StatefulSetView {
        let spec = sts.spec.as_ref();
        StatefulSetView {
            name: sts.metadata.name.clone().unwrap_or_else(|| "?".into()),
            hash: sts
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(HASH_ANNOTATION))
                .cloned(),
            generation: sts.metadata.generation.unwrap_or(0),
            replicas: spec.and_then(|s| s.replicas).unwrap_or(1),
            partition: spec
                .and_then(|s| s.update_strategy.as_ref())
                .and_then(|u| u.rolling_update.as_ref())
                .and_then(|r| r.partition)
                .unwrap_or(0),
            status: sts.status.as_ref().map(|st| StatefulSetCounts {
                observed_generation: st.observed_generation.unwrap_or(0),
                replicas: st.replicas,
                ready: st.ready_replicas.unwrap_or(0),
                updated: st.updated_replicas.unwrap_or(0),
                current: st.current_replicas.unwrap_or(0),
                current_revision: st.current_revision.clone(),
                update_revision: st.update_revision.clone(),
            }),
        }
    }
}

/// What health reads of a pod. The controller's watch keeps this instead of the typed
/// object (about 5 KiB of status and metadata each, at 30,000 pods the most of its memory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    /// `status.phase` (`Pending` when unset); `None` when the pod has no status at all.
    pub phase: Option<String>,
    /// Its containers in the waiting state, init containers first, in status order.
    pub waiting: Vec<Waiting>,
    /// The message of a `PodScheduled` condition that is `False` (unschedulable).
    pub unschedulable: Option<String>,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
    /// Its last sign of progress: created, or a condition turning `True`.
    pub progressed_at: Option<Timestamp>,
}

/// A container waiting, with the kubelet's reason and message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Waiting {
    pub container: String,
    pub reason: String,
    pub message: Option<String>,
}

impl From<&Pod> for PodView {
    fn from(pod: &Pod) -> PodView {
        let status = pod.status.as_ref();
        let conditions = status
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        let condition = |t: &str| conditions.iter().find(|c| c.type_ == t);
        let waiting = status
            .into_iter()
            .flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            })
            .filter_map(|c| {
                let w = c.state.as_ref()?.waiting.as_ref()?;
                Some(Waiting {
                    container: c.name.clone(),
                    reason: w.reason.clone().unwrap_or_default(),
                    message: w.message.clone(),
                })
            })
            .collect();
        let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let transitions = conditions
            .iter()
            .filter(|c| c.status == "True")
            .filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0));
        PodView {
            name: pod.metadata.name.clone().unwrap_or_else(|| "?".into()),
            phase: status.map(|s| s.phase.clone().unwrap_or_else(|| "Pending".into())),
            waiting,
            unschedulable: condition("PodScheduled")
                .filter(|c| c.status == "False")
                .map(|c| c.message.clone().unwrap_or_else(|| "not scheduled".into())),
            ready: condition("Ready").is_some_and(|c| c.status == "True"),
            progressed_at: created.into_iter().chain(transitions).max(),
        }
    }
}

/// What one environment runs, as observed.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Shared with the watch's store (judging every environment copies nothing).
    pub stateful_sets: Vec<std::sync::Arc<StatefulSetView>>,
    pub pods: Vec<std::sync::Arc<PodView>>,
    /// When envctl last applied a change to it (its namespace's `applied-at`), if known.
    pub applied_at: Option<Timestamp>,
}

impl Observed {
    /// Each StatefulSet's desired-hash (`HASH_ANNOTATION`), by name: which version of its
    /// desired state this observation shows.
    pub fn stateful_set_hashes(&self) -> BTreeMap<String, String> {
        self.stateful_sets
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.hash.clone()?)))
            .collect()
    }
}

/// A judgement made from what a watch `seen` (StatefulSet name to desired-hash), taken as of
/// an apply that wrote `applied` (the same, for the StatefulSets it wrote). A judgement that
/// saw any of them older than the apply (the watch had not caught up yet) says nothing about
/// what was applied: it is `Progressing`, reason `Applying`, until the watch shows it.
pub fn as_of_apply(
    judged: &Health,
    seen: &BTreeMap<String, String>,
    applied: &BTreeMap<String, String>,
) -> Health {
    let behind: Vec<&str> = applied
        .iter()
        .filter(|(name, hash)| seen.get(*name) != Some(*hash))
        .map(|(name, _)| name.as_str())
        .collect();
    if behind.is_empty() {
        return judged.clone();
    }
    Health::new(
        HealthState::Progressing,
        "Applying",
        format!(
            "waiting for the watch to show the applied version of StatefulSet {}",
            behind.join(", ")
        ),
    )
}

/// Container waiting reasons that do not fix themselves: the environment is `Degraded` at once.
const IMAGE_REASONS: [&str; 5] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "ImageInspectError",
];
const CRASH_REASONS: [&str; 3] = [
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "RunContainerError",
];

/// The health of one environment at `now`. A rollout that has not become Ready within
/// `deadline` of its last progress (the apply, a pod created or a pod turning ready) is
/// `Degraded`, keeping the reason it was waiting for.
pub fn assess(observed: &Observed, now: Timestamp, deadline: Duration) -> Health {
    if observed.stateful_sets.is_empty() {
        return Health::unknown("no StatefulSet observed yet");
    }
    // Failures that need no deadline come first: they name the pod.
    for pod in sorted_pods(&observed.pods) {
        if let Some(h) = pod_failure(pod) {
            return h;
        }
    }
    let mut waiting: Vec<Health> = observed
        .stateful_sets
        .iter()
        .filter_map(|s| stateful_set_progress(s))
        .collect();
    if waiting.is_empty() {
        let n = observed.stateful_sets.len();
        return Health::new(
            HealthState::Ready,
            "AllReady",
            format!("{n} StatefulSet(s) at their newest revision with every replica ready"),
        );
    }
    // A pod-level cause explains a StatefulSet that waits better than its counters do.
    let mut health = sorted_pods(&observed.pods)
        .into_iter()
        .find_map(pod_waiting)
        .unwrap_or_else(|| waiting.remove(0));
    let since = last_progress(observed);
    if let Some(since) = since {
        let waited = now.duration_since(since);
        let limit = k8s_openapi::jiff::SignedDuration::try_from(deadline)
            .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
        if waited > limit {
            health.state = HealthState::Degraded;
            health.message = format!(
                "{} (no progress for {}s, past the {}s deadline)",
                health.message,
                waited.as_secs(),
                deadline.as_secs()
            );
            if health.reason != "Unschedulable" {
                health.reason = "ProgressDeadlineExceeded".into();
            }
        }
    }
    health
}

fn sorted_pods(pods: &[std::sync::Arc<PodView>]) -> Vec<&PodView> {
    let mut v: Vec<&PodView> = pods.iter().map(|p| &**p).collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// An image that cannot be had or a container that keeps crashing.
fn pod_failure(pod: &PodView) -> Option<Health> {
    pod.waiting.iter().find_map(|w| {
        let reason = w.reason.as_str();
        let kind = if IMAGE_REASONS.contains(&reason) {
            "ImagePull"
        } else if CRASH_REASONS.contains(&reason) {
            "CrashLoop"
        } else {
            return None;
        };
        let detail = w.message.as_deref().unwrap_or(reason);
        Some(Health::new(
            HealthState::Degraded,
            kind,
            format!(
                "pod {} container {}: {reason}: {detail}",
                pod.name, w.container
            ),
        ))
    })
}

/// Why a pod is not ready yet: unschedulable (with the scheduler's message) or not ready.
fn pod_waiting(pod: &PodView) -> Option<Health> {
    let phase = pod.phase.as_deref()?;
    if let Some(message) = &pod.unschedulable {
        return Some(Health::new(
            HealthState::Progressing,
            "Unschedulable",
            format!("pod {}: {message}", pod.name),
        ));
    }
    if pod.ready {
        return None;
    }
    Some(Health::new(
        HealthState::Progressing,
        "PodNotReady",
        format!("pod {} is {phase} and not ready", pod.name),
    ))
}

/// kstatus's rules for a StatefulSet: `None` when it is current.
fn stateful_set_progress(sts: &StatefulSetView) -> Option<Health> {
    let name = &sts.name;
    let progressing = |msg: String| Some(Health::new(HealthState::Progressing, "Rollout", msg));
    let Some(status) = sts.status.as_ref() else {
        return progressing(format!("StatefulSet {name} has no status yet"));
    };
    let generation = sts.generation;
    let observed = status.observed_generation;
    if observed < generation {
        return progressing(format!(
            "StatefulSet {name}: generation {generation} is not observed yet (observed {observed})"
        ));
    }
    let (replicas, partition) = (sts.replicas, sts.partition);
    let (ready, updated, current) = (status.ready, status.updated, status.current);
    if status.replicas > replicas {
        return progressing(format!(
            "StatefulSet {name}: {} replicas exist, {replicas} wanted (scaling down)",
            status.replicas
        ));
    }
    if ready < replicas {
        return progressing(format!(
            "StatefulSet {name}: {ready}/{replicas} replicas ready"
        ));
    }
    if partition == 0 && replicas > 0 {
        if updated < replicas {
            return progressing(format!(
                "StatefulSet {name}: {updated}/{replicas} replicas at the newest revision"
            ));
        }
        if status.current_revision != status.update_revision && current < replicas {
            return progressing(format!(
                "StatefulSet {name}: rolling out revision {}",
                status.update_revision.as_deref().unwrap_or("?")
            ));
        }
    }
    None
}

/// The last sign of progress: the apply, a pod created, a pod becoming ready or scheduled.
fn last_progress(observed: &Observed) -> Option<Timestamp> {
    let pods = observed.pods.iter().filter_map(|p| p.progressed_at);
    observed.applied_at.into_iter().chain(pods).max()
}

/// When a not-yet-Ready environment turns `Degraded` if nothing moves: its last progress
/// plus the deadline (`None` when it is Ready, already Degraded or has no timestamps).
pub fn degrades_at(observed: &Observed, health: &Health, deadline: Duration) -> Option<Timestamp> {
    if health.state != HealthState::Progressing {
        return None;
    }
    let span = k8s_openapi::jiff::SignedDuration::try_from(deadline).ok()?;
    last_progress(observed)?.checked_add(span).ok()
}

/// Health of many environments at once, by environment name.
pub fn assess_all(
    observed: &BTreeMap<String, Observed>,
    now: Timestamp,
    deadline: Duration,
) -> BTreeMap<String, Health> {
    observed
        .iter()
        .map(|(env, o)| (env.clone(), assess(o, now, deadline)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(json: serde_json::Value) -> StatefulSet {
        serde_json::from_value(json).expect("a StatefulSet")
    }
    fn view(s: &StatefulSet) -> std::sync::Arc<StatefulSetView> {
        std::sync::Arc::new(s.into())
    }
    fn pod(json: serde_json::Value) -> std::sync::Arc<PodView> {
        let pod: Pod = serde_json::from_value(json).expect("a Pod");
        std::sync::Arc::new(PodView::from(&pod))
    }
    fn at(s: &str) -> Timestamp {
        s.parse().expect("a timestamp")
    }
    const DEADLINE: Duration = Duration::from_secs(600);

    fn ready_sts() -> StatefulSet {
        sts(serde_json::json!({
            "metadata": {"name": "environmentd", "generation": 2},
            "spec": {"replicas": 2, "selector": {}, "serviceName": "x", "template": {}},
            "status": {"observedGeneration": 2, "replicas": 2, "readyReplicas": 2,
                       "currentReplicas": 2, "updatedReplicas": 2,
                       "currentRevision": "r2", "updateRevision": "r2"}
        }))
    }

    #[test]
    fn ready_when_every_replica_is_ready_at_the_newest_revision() {
        let o = Observed {
            stateful_sets: vec![view(&ready_sts())],
            ..Observed::default()
        };
        let h = assess(&o, at("2026-01-01T00:00:00Z"), DEADLINE);
        assert_eq!(h.state, HealthState::Ready, "{h:?}");
    }

    #[test]
    fn nothing_observed_is_unknown() {
        let h = assess(&Observed::default(), at("2026-01-01T00:00:00Z"), DEADLINE);
        assert_eq!(h.state, HealthState::Unknown);
    }

    #[test]
    fn an_unobserved_generation_or_a_revision_in_flight_is_progressing() {
        let mut s = ready_sts();
        s.metadata.generation = Some(3);
        let o = Observed {
            stateful_sets: vec![view(&s)],
            ..Observed::default()
        };
        let h = assess(&o, at("2026-01-01T00:00:00Z"), DEADLINE);
        assert_eq!(
            (h.state, h.reason.as_str()),
            (HealthState::Progressing, "Rollout")
        );
        let mut s = ready_sts();
        if let Some(st) = s.status.as_mut() {
            st.update_revision = Some("r3".into());
            st.updated_replicas = Some(1);
        }
        let o = Observed {
            stateful_sets: vec![view(&s)],
            ..Observed::default()
        };
        let h = assess(&o, at("2026-01-01T00:00:00Z"), DEADLINE);
        assert_eq!(h.state, HealthState::Progressing, "{h:?}");
        assert!(h.message.contains("1/2"), "{h:?}");
    }

    #[test]
    fn unschedulable_names_the_scheduler_message_and_degrades_past_the_deadline() {
        let mut s = ready_sts();
        if let Some(st) = s.status.as_mut() {
            st.ready_replicas = Some(1);
        }
        let p = pod(serde_json::json!({
            "metadata": {"name": "environmentd-1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/2 nodes are available: 2 Insufficient cpu.",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }));
        let o = Observed {
            stateful_sets: vec![view(&s)],
            pods: vec![p],
            applied_at: Some(at("2026-01-01T00:00:00Z")),
        };
        let h = assess(&o, at("2026-01-01T00:05:00Z"), DEADLINE);
        assert_eq!(
            (h.state, h.reason.as_str()),
            (HealthState::Progressing, "Unschedulable")
        );
        assert!(h.message.contains("Insufficient cpu"), "{h:?}");
        let h = assess(&o, at("2026-01-01T00:10:01Z"), DEADLINE);
        assert_eq!(
            (h.state, h.reason.as_str()),
            (HealthState::Degraded, "Unschedulable")
        );
        assert!(h.message.contains("past the 600s deadline"), "{h:?}");
    }

    #[test]
    fn image_failures_and_crash_loops_degrade_at_once() {
        for (reason, kind) in [
            ("ErrImageNeverPull", "ImagePull"),
            ("ImagePullBackOff", "ImagePull"),
            ("CrashLoopBackOff", "CrashLoop"),
        ] {
            let p = pod(serde_json::json!({
                "metadata": {"name": "environmentd-0"},
                "status": {"phase": "Pending", "containerStatuses": [{
                    "name": "environmentd", "image": "x", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": reason, "message": "no image"}}}]}
            }));
            let o = Observed {
                stateful_sets: vec![view(&ready_sts())],
                pods: vec![p],
                applied_at: None,
            };
            let h = assess(&o, at("2026-01-01T00:00:00Z"), DEADLINE);
            assert_eq!((h.state, h.reason.as_str()), (HealthState::Degraded, kind));
            assert!(h.message.contains(reason), "{h:?}");
        }
    }

    #[test]
    fn progress_resets_the_deadline() {
        let mut s = ready_sts();
        if let Some(st) = s.status.as_mut() {
            st.ready_replicas = Some(1);
        }
        let p = pod(serde_json::json!({
            "metadata": {"name": "environmentd-1", "creationTimestamp": "2026-01-01T00:20:00Z"},
            "status": {"phase": "Running", "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:20:00Z"},
                {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:20:00Z"}]}
        }));
        let o = Observed {
            stateful_sets: vec![view(&s)],
            pods: vec![p],
            applied_at: Some(at("2026-01-01T00:00:00Z")),
        };
        let h = assess(&o, at("2026-01-01T00:25:00Z"), DEADLINE);
        assert_eq!(
            (h.state, h.reason.as_str()),
            (HealthState::Progressing, "PodNotReady")
        );
    }

    #[test]
    fn a_judgement_older_than_the_apply_is_not_trusted() {
        let ready = Health::new(HealthState::Ready, "AllReady", "2/2");
        let mut o = Observed {
            stateful_sets: vec![view(&ready_sts())],
            ..Observed::default()
        };
        std::sync::Arc::make_mut(&mut o.stateful_sets[0]).hash = Some("old".to_string());
        let seen = o.stateful_set_hashes();
        assert_eq!(seen.get("environmentd").map(String::as_str), Some("old"));
        let applied: BTreeMap<String, String> =
            [("environmentd".to_string(), "new".to_string())].into();
        let h = as_of_apply(&ready, &seen, &applied);
        assert_eq!(h.state, HealthState::Progressing);
        assert_eq!(h.reason, "Applying");
        assert!(h.message.contains("environmentd"), "{}", h.message);
        // Once the watch shows the applied version, the judgement stands.
        let caught_up: BTreeMap<String, String> =
            [("environmentd".to_string(), "new".to_string())].into();
        assert_eq!(as_of_apply(&ready, &caught_up, &applied), ready);
        // A StatefulSet the apply did not write does not matter; nothing applied, nothing to wait for.
        assert_eq!(as_of_apply(&ready, &seen, &BTreeMap::new()), ready);
    }
}
