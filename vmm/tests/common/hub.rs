//! A real hub (`bulkhead_ipc::hub::Hub`) in-process on a thread, with a policy directory and
//! an audit log in a temporary directory: the VMM tests' counterpart of init's hub.

use std::path::PathBuf;
use std::thread::JoinHandle;

use bulkhead_ipc::channel::Channel;
use bulkhead_ipc::hub::budget::Budgets;
use bulkhead_ipc::hub::{Hub, HubConfig};
use bulkhead_policy::RootDir;

pub struct TestHub {
    _dir: tempfile::TempDir,
    audit: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl TestHub {
    /// Starts a hub with `policy` and one channel per VM; returns the VMM ends.
    pub fn start(policy: &str, vms: &[&str], queue: usize) -> (TestHub, Vec<Channel>) {
        let dir = tempfile::tempdir().unwrap();
        let pdir = dir.path().join("policy.d");
        std::fs::create_dir(&pdir).unwrap();
        std::fs::write(pdir.join("10-test.policy"), policy).unwrap();
        let audit = dir.path().join("audit.jsonl");
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        for vm in vms {
            let (v, h) = Channel::pair().unwrap();
            mine.push(v);
            theirs.push((vm.to_string(), h));
        }
        let cfg = HubConfig {
            roots: vec![RootDir {
                path: pdir,
                prefix: String::new(),
                required: true,
            }],
            audit: Some(audit.clone()),
            control_socket: None,
            exit_when_no_vms: true,
            budgets: Budgets::new(queue, 16),
        };
        let mut hub = Hub::new(cfg, theirs).unwrap();
        let thread = std::thread::spawn(move || hub.run().unwrap());
        (
            TestHub {
                _dir: dir,
                audit,
                thread: Some(thread),
            },
            mine,
        )
    }

    /// The audit log so far.
    pub fn audit(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }

    /// Waits until every channel closed and the hub returned.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}
