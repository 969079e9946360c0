//! The supervision state machine: restart policy, exponential backoff, burst limit.
//!
//! Pure: it never spawns, sleeps or reads a clock. The caller passes `now` (a monotonic
//! duration since an arbitrary origin), spawns what [`Supervisor::due`] names, and reports
//! starts and exits back. A child is anything with a start recipe the caller knows how to
//! run: a service today, a VMM process once `[[vm]]` tables exist.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::{RestartParams, RestartPolicy, VMM_REBOOT_STATUS};

/// Index of a child in its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChildId(pub usize);

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// exit(status).
    Exited(i32),
    /// Killed by a signal (its name, e.g. `SIGKILL`).
    Signaled(String),
    /// The program could not be started at all.
    SpawnFailed(String),
}

impl ExitKind {
    /// Non-zero status, a signal, or no start: what `on-failure` restarts.
    pub fn is_failure(&self) -> bool {
        !matches!(self, ExitKind::Exited(0))
    }
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Exited(s) => write!(f, "exited with status {s}"),
            ExitKind::Signaled(sig) => write!(f, "killed by signal {sig}"),
            ExitKind::SpawnFailed(e) => write!(f, "could not start: {e}"),
        }
    }
}

/// Where a child is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// To be started once `now >= at`.
    Waiting {
        /// When.
        at: Duration,
    },
    /// Running as `pid` since `since`.
    Running {
        /// Process id.
        pid: i32,
        /// Start time.
        since: Duration,
    },
    /// Asked to stop (by an operator, the hub's failure, or shutdown); `then` says what
    /// happens once it has exited.
    Stopping {
        /// Process id.
        pid: i32,
        /// What follows its exit.
        then: AfterStop,
    },
    /// Stopped because the hub it needs failed; started again once the hub runs
    /// (`[hub] on_failure = "hold-vms"`).
    Held,
    /// Ended for good under its restart policy.
    Done,
    /// Gave up: start limit reached.
    Failed,
    /// Stopped: by an operator, by the hub's failure, or by shutdown. Not restarted until
    /// someone starts it.
    Stopped,
}

/// What happens to a child once a requested stop has ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    /// It stays stopped (an operator's `stop`).
    Stop,
    /// It is started again at once (`restart`, or a VM after the hub restarted).
    Restart,
    /// It waits for the hub (see [`State::Held`]).
    Hold,
    /// The machine is going down.
    Shutdown,
}

impl State {
    /// Short name for status output.
    pub fn name(&self) -> &'static str {
        match self {
            State::Waiting { .. } => "waiting",
            State::Running { .. } => "running",
            State::Stopping { .. } => "stopping",
            State::Held => "held",
            State::Done => "done",
            State::Failed => "failed",
            State::Stopped => "stopped",
        }
    }

    /// The live process, if any.
    pub fn pid(&self) -> Option<i32> {
        match self {
            State::Running { pid, .. } | State::Stopping { pid, .. } => Some(*pid),
            _ => None,
        }
    }
}

/// What the supervisor decided after a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It will be started again after `delay`.
    Restart {
        /// Backoff delay.
        delay: Duration,
    },
    /// It ended for good (restart policy says no).
    Ended,
    /// Start limit reached: `burst` starts within `interval`.
    Failed {
        /// The limit.
        burst: u32,
        /// The window.
        interval: Duration,
    },
    /// It was being stopped and stays stopped (or held, or the machine goes down).
    Stopped,
    /// It was being restarted on request: it starts again at once.
    Restarting,
}

/// One supervised child.
#[derive(Debug, Clone)]
pub struct Child {
    /// Its name.
    pub name: String,
    /// Its restart parameters.
    pub params: RestartParams,
    /// Current state.
    pub state: State,
    /// Total starts so far.
    pub starts: u32,
    /// How the last run ended.
    pub last_exit: Option<ExitKind>,
    /// Start times inside the current burst window.
    recent_starts: VecDeque<Duration>,
    /// Restarts since the last stable run (the backoff exponent).
    consecutive: u32,
    /// Global start order of the current run (for reverse-order shutdown).
    start_seq: u64,
    /// A support process (the hub): it runs for the others and does not by itself keep the
    /// machine from being idle.
    pub support: bool,
}

/// All supervised children.
#[derive(Debug, Default)]
pub struct Supervisor {
    children: Vec<Child>,
    next_seq: u64,
}

impl Supervisor {
    /// No children yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a child, due to start at once.
    pub fn add(&mut self, name: &str, params: RestartParams) -> ChildId {
        self.children.push(Child {
            name: name.to_string(),
            params,
            state: State::Waiting { at: Duration::ZERO },
            starts: 0,
            last_exit: None,
            recent_starts: VecDeque::new(),
            consecutive: 0,
            start_seq: 0,
            support: false,
        });
        ChildId(self.children.len() - 1)
    }

    /// Marks a child as a support process (see [`Child::support`]).
    pub fn set_support(&mut self, id: ChildId) {
        if let Some(c) = self.children.get_mut(id.0) {
            c.support = true;
        }
    }

    /// The child, if the id is valid.
    pub fn child(&self, id: ChildId) -> Option<&Child> {
        self.children.get(id.0)
    }

    /// Every child with its id.
    pub fn children(&self) -> impl Iterator<Item = (ChildId, &Child)> {
        self.children
            .iter()
            .enumerate()
            .map(|(i, c)| (ChildId(i), c))
    }

    /// Children whose start time has come.
    pub fn due(&self, now: Duration) -> Vec<ChildId> {
        self.children()
            .filter(|(_, c)| matches!(c.state, State::Waiting { at } if at <= now))
            .map(|(id, _)| id)
            .collect()
    }

    /// The earliest pending start, for the event loop's timeout.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.children
            .iter()
            .filter_map(|c| match c.state {
                State::Waiting { at } => Some(at),
                _ => None,
            })
            .min()
    }

    /// Records a successful start. Returns the start count (1 for the first start).
    pub fn started(&mut self, id: ChildId, pid: i32, now: Duration) -> u32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let Some(c) = self.children.get_mut(id.0) else {
            return 0;
        };
        c.starts = c.starts.saturating_add(1);
        c.recent_starts.push_back(now);
        c.state = State::Running { pid, since: now };
        c.start_seq = seq;
        c.starts
    }

    /// Records a start that failed before the program ran; counts as a start and a failed
    /// exit.
    pub fn spawn_failed(&mut self, id: ChildId, error: String, now: Duration) -> Decision {
        let Some(c) = self.children.get_mut(id.0) else {
            return Decision::Ended;
        };
        c.starts = c.starts.saturating_add(1);
        c.recent_starts.push_back(now);
        c.state = State::Running { pid: 0, since: now };
        Self::ended(c, ExitKind::SpawnFailed(error), now)
    }

    /// Records that `pid` ended. `None` when the pid is not one of ours (an orphan).
    pub fn exited(
        &mut self,
        pid: i32,
        kind: ExitKind,
        now: Duration,
    ) -> Option<(ChildId, Decision)> {
        let (i, c) = self
            .children
            .iter_mut()
            .enumerate()
            .find(|(_, c)| c.state.pid() == Some(pid))?;
        Some((ChildId(i), Self::ended(c, kind, now)))
    }

    fn ended(c: &mut Child, kind: ExitKind, now: Duration) -> Decision {
        let failure = kind.is_failure();
        let rebooted = matches!(kind, ExitKind::Exited(s) if s == VMM_REBOOT_STATUS);
        c.last_exit = Some(kind);
        let since = match c.state {
            State::Stopping { then, .. } => {
                return match then {
                    AfterStop::Restart => {
                        c.state = State::Waiting { at: now };
                        Decision::Restarting
                    }
                    AfterStop::Hold => {
                        c.state = State::Held;
                        Decision::Stopped
                    }
                    AfterStop::Stop | AfterStop::Shutdown => {
                        c.state = State::Stopped;
                        Decision::Stopped
                    }
                };
            }
            State::Running { since, .. } => since,
            _ => now,
        };
        let p = &c.params;
        let restart = match p.policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => failure,
            RestartPolicy::Always => true,
            RestartPolicy::OnReboot => rebooted,
        };
        if !restart {
            c.state = State::Done;
            return Decision::Ended;
        }
        if now.saturating_sub(since) >= p.stable_after {
            c.consecutive = 0;
        }
        let delay = backoff(p.delay, p.delay_max, c.consecutive);
        let next_start = now.saturating_add(delay);
        // Starts that will still be inside the window when the next start happens.
        while let Some(&t) = c.recent_starts.front() {
            if t.saturating_add(p.burst_interval) <= next_start {
                c.recent_starts.pop_front();
            } else {
                break;
            }
        }
        if c.recent_starts.len() >= p.burst as usize {
            c.state = State::Failed;
            return Decision::Failed {
                burst: p.burst,
                interval: p.burst_interval,
            };
        }
        c.consecutive = c.consecutive.saturating_add(1);
        c.state = State::Waiting { at: next_start };
        Decision::Restart { delay }
    }

    /// True when no child runs or waits to run, i.e. every one is done, failed or stopped,
    /// support processes aside. Vacuously true with no children.
    pub fn all_ended(&self) -> bool {
        self.children
            .iter()
            .filter(|c| !c.support)
            .all(|c| matches!(c.state, State::Done | State::Failed | State::Stopped))
    }

    /// Shutdown: cancels pending restarts and returns the live children in reverse start
    /// order, each moved to `Stopping` (those already stopping stay so, their end now
    /// final), with whether it is a support process (stopped last).
    pub fn begin_stop(&mut self) -> Vec<(ChildId, i32, bool)> {
        let mut live: Vec<(u64, ChildId, i32, bool)> = Vec::new();
        for (i, c) in self.children.iter_mut().enumerate() {
            match c.state {
                State::Waiting { .. } | State::Held => c.state = State::Stopped,
                State::Running { pid, .. } | State::Stopping { pid, .. } => {
                    c.state = State::Stopping {
                        pid,
                        then: AfterStop::Shutdown,
                    };
                    live.push((c.start_seq, ChildId(i), pid, c.support));
                }
                _ => {}
            }
        }
        live.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        live.into_iter()
            .map(|(_, id, pid, support)| (id, pid, support))
            .collect()
    }

    /// A request to stop a child (an operator's `stop` or `restart`, the hub's failure):
    /// a running one moves to `Stopping` with `then` and its pid is returned, for the caller
    /// to signal; one that is not running moves where `then` leads at once (`Restart`:
    /// due now). A child already stopping keeps its pid and gets the new `then`.
    pub fn request_stop(&mut self, id: ChildId, then: AfterStop, now: Duration) -> Option<i32> {
        let c = self.children.get_mut(id.0)?;
        match c.state {
            State::Running { pid, .. } => {
                c.state = State::Stopping { pid, then };
                Some(pid)
            }
            State::Stopping { pid, then: old } => {
                if old != AfterStop::Shutdown {
                    c.state = State::Stopping { pid, then };
                }
                None
            }
            _ => {
                c.state = match (then, &c.state) {
                    (AfterStop::Restart, State::Failed) => State::Failed,
                    (AfterStop::Restart, _) => State::Waiting { at: now },
                    (AfterStop::Hold, State::Done | State::Failed) => c.state.clone(),
                    (AfterStop::Hold, _) => State::Held,
                    (AfterStop::Stop | AfterStop::Shutdown, State::Failed) => State::Failed,
                    (AfterStop::Stop | AfterStop::Shutdown, _) => State::Stopped,
                };
                None
            }
        }
    }

    /// An operator's `start`: a child that is not running (stopped, done, held, or backing
    /// off) is due at once and its backoff starts over. A failed one is refused: its start
    /// limit holds until `reset-failed`.
    pub fn request_start(&mut self, id: ChildId, now: Duration) -> Result<StartOutcome, String> {
        let c = self
            .children
            .get_mut(id.0)
            .ok_or_else(|| "no such child".to_string())?;
        match c.state {
            State::Running { .. } => Ok(StartOutcome::AlreadyRunning),
            State::Stopping { pid, then } => {
                if then == AfterStop::Shutdown {
                    return Err("the machine is shutting down".into());
                }
                c.state = State::Stopping {
                    pid,
                    then: AfterStop::Restart,
                };
                Ok(StartOutcome::AfterStop)
            }
            State::Failed => Err(format!(
                "{} failed (start limit reached: {} starts in {} ms); `reset-failed {}` \
                 forgets its starts and starts it",
                c.name,
                c.params.burst,
                c.params.burst_interval.as_millis(),
                c.name
            )),
            State::Waiting { .. } | State::Held | State::Done | State::Stopped => {
                c.consecutive = 0;
                c.state = State::Waiting { at: now };
                Ok(StartOutcome::Due)
            }
        }
    }

    /// An operator's `reset-failed`: forgets the child's start history (burst window and
    /// backoff); a failed child is started again at once. Returns whether it was failed.
    pub fn reset_failed(&mut self, id: ChildId, now: Duration) -> bool {
        let Some(c) = self.children.get_mut(id.0) else {
            return false;
        };
        c.recent_starts.clear();
        c.consecutive = 0;
        if c.state == State::Failed {
            c.state = State::Waiting { at: now };
            return true;
        }
        false
    }

    /// Moves every held child to "due now" (the hub runs again); returns them.
    pub fn release_held(&mut self, now: Duration) -> Vec<ChildId> {
        let mut out = Vec::new();
        for (i, c) in self.children.iter_mut().enumerate() {
            if c.state == State::Held {
                c.consecutive = 0;
                c.state = State::Waiting { at: now };
                out.push(ChildId(i));
            }
        }
        out
    }

    /// The id of the child called `name`.
    pub fn find(&self, name: &str) -> Option<ChildId> {
        self.children
            .iter()
            .position(|c| c.name == name)
            .map(ChildId)
    }
}

/// What an operator's `start` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// It is due now.
    Due,
    /// It was running already.
    AlreadyRunning,
    /// It is stopping; it starts again once it has exited.
    AfterStop,
}

/// `first * 2^n`, capped at `max`.
pub fn backoff(first: Duration, max: Duration, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
    first.checked_mul(factor).unwrap_or(max).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn params(policy: RestartPolicy) -> RestartParams {
        RestartParams {
            policy,
            delay: ms(1000),
            delay_max: ms(60_000),
            stable_after: ms(30_000),
            burst: 5,
            burst_interval: ms(60_000),
            stop_timeout: ms(5000),
        }
    }

    /// Starts whatever is due at `now` with pid `pid`; returns the start count.
    fn start_due(s: &mut Supervisor, now: Duration, pid: i32) -> Option<u32> {
        let due = s.due(now);
        assert!(due.len() <= 1);
        due.first().map(|&id| s.started(id, pid, now))
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(ms(1000), ms(60_000), 0), ms(1000));
        assert_eq!(backoff(ms(1000), ms(60_000), 3), ms(8000));
        assert_eq!(backoff(ms(1000), ms(60_000), 6), ms(60_000));
        assert_eq!(backoff(ms(1000), ms(60_000), 200), ms(60_000));
        assert_eq!(backoff(Duration::MAX, Duration::MAX, 5), Duration::MAX);
    }

    #[test]
    fn crash_loop_backs_off_then_fails_at_burst() {
        let mut s = Supervisor::new();
        let id = s.add("crashy", params(RestartPolicy::OnFailure));
        let mut now = ms(0);
        let mut delays = Vec::new();
        for k in 1..=5 {
            assert_eq!(start_due(&mut s, now, 100 + k), Some(k as u32));
            now += ms(10);
            let (got, d) = s.exited(100 + k, ExitKind::Exited(1), now).unwrap();
            assert_eq!(got, id);
            match d {
                Decision::Restart { delay } => {
                    delays.push(delay);
                    // Not due before the delay has passed.
                    assert!(s.due(now + delay - ms(1)).is_empty());
                    assert_eq!(s.next_deadline(), Some(now + delay));
                    now += delay;
                }
                Decision::Failed { burst, interval } => {
                    assert_eq!(k, 5);
                    assert_eq!((burst, interval), (5, ms(60_000)));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(delays, vec![ms(1000), ms(2000), ms(4000), ms(8000)]);
        assert_eq!(s.child(id).unwrap().state, State::Failed);
        assert!(s.all_ended());
        assert!(s.due(now + ms(1_000_000)).is_empty());
    }

    #[test]
    fn stable_run_resets_backoff() {
        let mut s = Supervisor::new();
        s.add("svc", params(RestartPolicy::Always));
        start_due(&mut s, ms(0), 1);
        let (_, d) = s.exited(1, ExitKind::Exited(0), ms(5)).unwrap();
        assert_eq!(d, Decision::Restart { delay: ms(1000) });
        start_due(&mut s, ms(1005), 2);
        let (_, d) = s.exited(2, ExitKind::Exited(0), ms(1010)).unwrap();
        assert_eq!(d, Decision::Restart { delay: ms(2000) });
        start_due(&mut s, ms(3010), 3);
        // Runs for 40 s (> stable_after): back to the first delay.
        let (_, d) = s.exited(3, ExitKind::Exited(0), ms(43_010)).unwrap();
        assert_eq!(d, Decision::Restart { delay: ms(1000) });
    }

    #[test]
    fn starts_outside_the_window_do_not_count() {
        let mut s = Supervisor::new();
        let mut p = params(RestartPolicy::Always);
        p.burst = 2;
        p.burst_interval = ms(10_000);
        p.stable_after = ms(100);
        s.add("svc", p);
        let mut now = ms(0);
        // Each run lasts 20 s: only one start is ever inside a 10 s window.
        for pid in 1..20 {
            start_due(&mut s, now, pid).unwrap();
            now += ms(20_000);
            let (_, d) = s
                .exited(pid, ExitKind::Signaled("SIGSEGV".into()), now)
                .unwrap();
            assert_eq!(d, Decision::Restart { delay: ms(1000) });
            now += ms(1000);
        }
    }

    #[test]
    fn policies() {
        let mut s = Supervisor::new();
        let never = s.add("never", params(RestartPolicy::Never));
        let onf = s.add("onf", params(RestartPolicy::OnFailure));
        for (i, id) in s.due(ms(0)).into_iter().enumerate() {
            s.started(id, 10 + i as i32, ms(0));
        }
        assert_eq!(
            s.exited(10, ExitKind::Exited(1), ms(1)),
            Some((never, Decision::Ended))
        );
        assert!(!s.all_ended());
        assert_eq!(
            s.exited(11, ExitKind::Exited(0), ms(1)),
            Some((onf, Decision::Ended))
        );
        assert!(s.all_ended());
        assert_eq!(s.exited(99, ExitKind::Exited(0), ms(1)), None);
    }

    /// A VM restarted only when its guest rebooted (VMM status 3): not when it was killed,
    /// failed otherwise, or powered off.
    #[test]
    fn on_reboot_restarts_only_after_a_guest_reboot() {
        let mut s = Supervisor::new();
        let id = s.add("vm", params(RestartPolicy::OnReboot));
        let mut pid = 10;
        let mut now = ms(0);
        let mut start = |s: &mut Supervisor, now: Duration| -> i32 {
            let due = s.due(now);
            assert_eq!(due, vec![id]);
            pid += 1;
            s.started(id, pid, now);
            pid
        };
        let p = start(&mut s, now);
        now += ms(10);
        assert!(
            matches!(
                s.exited(p, ExitKind::Exited(3), now),
                Some((got, Decision::Restart { .. })) if got == id
            ),
            "a guest reboot restarts the VM"
        );
        now += ms(60_000);
        let p = start(&mut s, now);
        now += ms(10);
        assert_eq!(
            s.exited(p, ExitKind::Signaled("SIGKILL".into()), now),
            Some((id, Decision::Ended))
        );
        for end in [
            ExitKind::Exited(0),
            ExitKind::Exited(1),
            ExitKind::Exited(4),
        ] {
            let mut s = Supervisor::new();
            let id = s.add("vm", params(RestartPolicy::OnReboot));
            assert_eq!(s.due(ms(0)), vec![id]);
            s.started(id, 7, ms(0));
            let what = format!("{end:?}");
            assert_eq!(
                s.exited(7, end, ms(5)),
                Some((id, Decision::Ended)),
                "{what}"
            );
        }
    }

    #[test]
    fn on_failure_restarts_on_signal_and_spawn_failure() {
        let mut s = Supervisor::new();
        let id = s.add("svc", params(RestartPolicy::OnFailure));
        start_due(&mut s, ms(0), 5);
        assert!(matches!(
            s.exited(5, ExitKind::Signaled("SIGKILL".into()), ms(1)),
            Some((_, Decision::Restart { .. }))
        ));
        let d = s.spawn_failed(id, "no such file".into(), ms(1001));
        assert_eq!(d, Decision::Restart { delay: ms(2000) });
        assert_eq!(s.child(id).unwrap().starts, 2);
    }

    #[test]
    fn stop_in_reverse_start_order_without_restart() {
        let mut s = Supervisor::new();
        let a = s.add("a", params(RestartPolicy::Always));
        let b = s.add("b", params(RestartPolicy::Always));
        let c = s.add("c", params(RestartPolicy::Always));
        s.started(b, 2, ms(0));
        s.started(a, 1, ms(1));
        // c crashed and waits for its restart.
        s.started(c, 3, ms(2));
        s.exited(3, ExitKind::Exited(1), ms(3));
        let order = s.begin_stop();
        assert_eq!(order, vec![(a, 1, false), (b, 2, false)]);
        assert_eq!(s.child(c).unwrap().state, State::Stopped);
        assert_eq!(
            s.exited(1, ExitKind::Exited(0), ms(4)),
            Some((a, Decision::Stopped))
        );
        assert_eq!(s.child(a).unwrap().state, State::Stopped);
        assert!(s.due(ms(1_000_000)).is_empty());
    }

    #[test]
    fn a_running_support_process_does_not_keep_the_machine_busy() {
        let mut s = Supervisor::new();
        let hub = s.add("hub", params(RestartPolicy::Always));
        s.set_support(hub);
        let vm = s.add("vm", params(RestartPolicy::Never));
        for (i, id) in s.due(ms(0)).into_iter().enumerate() {
            s.started(id, 10 + i as i32, ms(0));
        }
        assert!(!s.all_ended());
        assert_eq!(
            s.exited(11, ExitKind::Exited(0), ms(1)),
            Some((vm, Decision::Ended))
        );
        assert!(s.all_ended());
    }

    #[test]
    fn an_operator_stops_starts_and_restarts_without_counting_a_failure() {
        let mut s = Supervisor::new();
        let id = s.add("vm", params(RestartPolicy::Always));
        start_due(&mut s, ms(0), 10);
        // stop: Stopping, then Stopped on exit, never restarted.
        assert_eq!(s.request_stop(id, AfterStop::Stop, ms(5)), Some(10));
        assert_eq!(
            s.exited(10, ExitKind::Signaled("SIGKILL".into()), ms(6)),
            Some((id, Decision::Stopped))
        );
        assert_eq!(s.child(id).unwrap().state, State::Stopped);
        assert!(s.due(ms(1_000_000)).is_empty());
        assert!(s.all_ended(), "a stopped service is not waited for");
        // start: due at once.
        assert_eq!(s.request_start(id, ms(7)), Ok(StartOutcome::Due));
        assert_eq!(start_due(&mut s, ms(7), 11), Some(2));
        assert_eq!(s.request_start(id, ms(8)), Ok(StartOutcome::AlreadyRunning));
        // restart: stopping, then due at once when it exits (no backoff).
        assert_eq!(s.request_stop(id, AfterStop::Restart, ms(9)), Some(11));
        assert_eq!(
            s.exited(11, ExitKind::Exited(0), ms(10)),
            Some((id, Decision::Restarting))
        );
        assert_eq!(start_due(&mut s, ms(10), 12), Some(3));
        // A start while it is stopping turns the stop into a restart.
        assert_eq!(s.request_stop(id, AfterStop::Stop, ms(11)), Some(12));
        assert_eq!(s.request_start(id, ms(11)), Ok(StartOutcome::AfterStop));
        assert_eq!(
            s.exited(12, ExitKind::Exited(0), ms(12)),
            Some((id, Decision::Restarting))
        );
    }

    #[test]
    fn a_failed_child_needs_reset_failed_which_starts_it_again() {
        let mut s = Supervisor::new();
        let mut p = params(RestartPolicy::OnFailure);
        p.burst = 2;
        let id = s.add("crashy", p);
        start_due(&mut s, ms(0), 1);
        assert!(matches!(
            s.exited(1, ExitKind::Exited(1), ms(1)),
            Some((_, Decision::Restart { .. }))
        ));
        start_due(&mut s, ms(1001), 2);
        assert!(matches!(
            s.exited(2, ExitKind::Exited(1), ms(1002)),
            Some((_, Decision::Failed { .. }))
        ));
        let e = s.request_start(id, ms(1003)).unwrap_err();
        assert!(e.contains("reset-failed crashy"), "{e}");
        assert_eq!(s.request_stop(id, AfterStop::Restart, ms(1003)), None);
        assert_eq!(s.child(id).unwrap().state, State::Failed);
        assert!(s.reset_failed(id, ms(1004)));
        assert_eq!(start_due(&mut s, ms(1004), 3), Some(3));
        // Its history is gone: the next failure backs off from the first delay.
        assert_eq!(
            s.exited(3, ExitKind::Exited(1), ms(1005)),
            Some((id, Decision::Restart { delay: ms(1000) }))
        );
        assert!(!s.reset_failed(id, ms(1006)), "not failed now");
    }

    #[test]
    fn held_children_wait_for_the_hub_and_shutdown_takes_everyone() {
        let mut s = Supervisor::new();
        let hub = s.add("hub", params(RestartPolicy::Always));
        s.set_support(hub);
        let vm = s.add("vm", params(RestartPolicy::Always));
        let idle = s.add("idle", params(RestartPolicy::Always));
        for (i, id) in s.due(ms(0)).into_iter().enumerate() {
            s.started(id, 10 + i as i32, ms(0));
        }
        assert_eq!(s.request_stop(vm, AfterStop::Hold, ms(1)), Some(11));
        assert_eq!(
            s.exited(11, ExitKind::Exited(0), ms(2)),
            Some((vm, Decision::Stopped))
        );
        assert_eq!(s.child(vm).unwrap().state, State::Held);
        assert!(!s.all_ended(), "a held VM waits to come back");
        assert!(s.due(ms(1_000_000)).is_empty());
        assert_eq!(s.release_held(ms(3)), vec![vm]);
        assert_eq!(s.due(ms(3)), vec![vm]);
        // Shutdown: the support process comes last and is marked.
        s.request_stop(idle, AfterStop::Stop, ms(4));
        let order = s.begin_stop();
        assert_eq!(order, vec![(idle, 12, false), (hub, 10, true)]);
        assert_eq!(s.child(vm).unwrap().state, State::Stopped);
        assert_eq!(
            s.request_start(idle, ms(5)).unwrap_err(),
            "the machine is shutting down"
        );
    }

    #[test]
    fn no_children_means_all_ended() {
        assert!(Supervisor::new().all_ended());
    }
}
