//! What the VMs do when the hub goes away and comes back.
//!
//! Every VM of a system with a `[hub]` has a hub channel (a socketpair init keeps both ends
//! of), and the hub keeps, per VM, what the VM provides and every connection it has: all of
//! it lives in the hub's memory only. So:
//!
//! * **The hub restarts** (it ended and its restart policy starts it again): the new hub
//!   knows none of the VMs' services and connections, and a VMM cannot tell (its channel
//!   never closed: init holds the other end). Init therefore **restarts every VM that was
//!   running when the hub ended**, once the hub runs again: power button, its stop
//!   timeout, SIGKILL, then started at once (a requested restart: no backoff, no failure).
//!   The new VMM says `Hello` on the same channel and registers again from scratch. A VM
//!   that starts while the hub is down needs nothing: its `Hello` waits in the channel for
//!   the next hub.
//! * **The hub fails** (past its start limit): init says so loudly and, as `[hub]
//!   on_failure` says, stops every VM (`stop-vms`, the default: they stay stopped until an
//!   operator starts them) or stops and holds them (`hold-vms`: state `held`, started again
//!   by init as soon as the hub runs again, after `bulkhead-ctl reset-failed hub`).

use std::time::Duration;

use log::{error, info};

use crate::config::HubFailure;
use crate::handoff::Role;
use crate::services::{Recipe, Services};
use crate::supervisor::{AfterStop, ChildId};

impl Services {
    /// The VMs that have a hub channel (they need the hub).
    pub(crate) fn hub_vms(&self) -> Vec<ChildId> {
        self.recipes
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                matches!(
                    &r.role,
                    Role::Vm {
                        channel: Some(_),
                        ..
                    }
                )
            })
            .map(|(i, _)| ChildId(i))
            .collect()
    }

    /// Called after every successful start: a VM remembers which hub run it registers
    /// with; the hub's start restarts the VMs registered with an earlier run and releases
    /// the held ones.
    pub(crate) fn after_start(&mut self, id: ChildId, recipe: &Recipe, now: Duration) {
        if matches!(recipe.role, Role::Vm { .. }) {
            self.hub_gen.insert(id.0, self.hub_ends);
            return;
        }
        if Some(id) != self.hub {
            return;
        }
        for vm in self.hub_vms() {
            let stale = self.hub_gen.get(&vm.0).is_some_and(|g| *g < self.hub_ends);
            let running = self
                .sup
                .child(vm)
                .is_some_and(|c| matches!(c.state, crate::supervisor::State::Running { .. }));
            if stale && running {
                let name = self
                    .sup
                    .child(vm)
                    .map(|c| c.name.clone())
                    .unwrap_or_default();
                info!("restarting {name}: the hub restarted, so its VM registers again");
                self.note(
                    vm,
                    "restarting: the hub restarted, so the VM registers again",
                );
                self.stop_child(vm, AfterStop::Restart, now);
            }
        }
        for vm in self.sup.release_held(now) {
            let name = self
                .sup
                .child(vm)
                .map(|c| c.name.clone())
                .unwrap_or_default();
            info!("starting {name}: the hub runs again");
            self.note(vm, "starting: the hub runs again");
        }
    }

    /// Called when the hub's run has ended; `failed`: past its start limit.
    pub(crate) fn hub_ended(&mut self, failed: bool, now: Duration) {
        self.hub_ends = self.hub_ends.saturating_add(1);
        if !failed {
            return;
        }
        let (then, what) = match self.on_hub_failure {
            HubFailure::StopVms => (
                AfterStop::Stop,
                "stopping every VM (on_failure = \"stop-vms\"); start them once the hub runs \
                 again",
            ),
            HubFailure::HoldVms => (
                AfterStop::Hold,
                "stopping and holding every VM (on_failure = \"hold-vms\"); they start again \
                 once the hub runs",
            ),
        };
        for line in [
            "*****************************************************************".to_string(),
            "THE HUB HAS FAILED: no VM can reach another until it runs again".to_string(),
            what.to_string(),
            "bring it back with: bulkhead-ctl reset-failed hub".to_string(),
            "*****************************************************************".to_string(),
        ] {
            error!("{line}");
        }
        for vm in self.hub_vms() {
            let name = self
                .sup
                .child(vm)
                .map(|c| c.name.clone())
                .unwrap_or_default();
            let note = match then {
                AfterStop::Hold => "stopping and holding: the hub has failed",
                _ => "stopping: the hub has failed",
            };
            info!("{note} ({name})");
            self.note(vm, note);
            self.stop_child(vm, then, now);
        }
        if self.hub_vms().is_empty() {
            error!("the hub has failed (no VM has a hub channel)");
        }
    }
}
