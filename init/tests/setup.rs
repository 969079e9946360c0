//! The setup child (module loading and device binding, which can hang in a driver) never
//! stops init's event loop from answering. The hang is faked (fault injection): the
//! child's work blocks on a pipe, or sleeps for ever, instead of in a driver.

use std::path::Path;
use std::sync::mpsc::channel;
use std::time::Duration;

use bulkhead_init::config::WhenIdle;
use bulkhead_init::control::{request, ControlServer, Request, Response};
use bulkhead_init::devices::VmGroups;
use bulkhead_init::runtime::Runtime;
use bulkhead_init::services::{Clock, Services};
use bulkhead_init::setup::{self, Setup};
use bulkhead_init::shutdown::PowerAction;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

const DEADLINE: Duration = Duration::from_secs(60);

fn runtime(socket: &Path) -> Runtime {
    Runtime {
        clock: Clock::new(),
        services: Services::default(),
        sfd: bulkhead_init::signals::signal_fd().unwrap(),
        control: Some(ControlServer::bind(socket, nix::unistd::geteuid().as_raw()).unwrap()),
        buttons: Vec::new(),
        when_idle: WhenIdle::Stay,
    }
}

/// Asks `req` on a thread and hands the answer to `then` (on that thread).
fn ask(socket: &Path, req: Request, then: impl FnOnce(Response) + Send + 'static) {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let answer = request(&socket, &req).unwrap();
        then(answer);
    });
}

#[test]
fn setup_faking_a_hang_still_lets_init_answer_then_its_report_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("init.sock");
    let mut rt = runtime(&socket);
    let (release_r, release_w) = nix::unistd::pipe().unwrap();
    let release_fd = std::os::fd::AsRawFd::as_raw_fd(&release_r);
    // The fake hang: the child blocks reading a pipe until the test writes to it.
    let mut worker = Setup::start(move || {
        let mut byte = [0u8; 1];
        // SAFETY: reads one byte into a live local buffer from a descriptor the child has.
        let _ = unsafe { libc::read(release_fd, byte.as_mut_ptr().cast(), 1) };
        VmGroups::from([("edu-vm".to_string(), vec![3])])
    })
    .unwrap();
    drop(release_r);
    let (answered_tx, answered) = channel();
    ask(&socket, Request::Status, move |answer| {
        let _ = answered_tx.send(answer);
        // Only once init has answered does the child's work go on.
        nix::unistd::write(&release_w, b"x").unwrap();
    });
    assert_eq!(rt.wait_for_setup(&mut worker, DEADLINE), None);
    assert!(worker.finished(), "gave up before the child reported");
    assert!(matches!(
        answered.recv_timeout(Duration::ZERO),
        Ok(Response::Status { .. })
    ));
    assert_eq!(
        worker.groups(),
        VmGroups::from([("edu-vm".to_string(), vec![3])])
    );
}

#[test]
fn setup_faking_a_hang_is_given_up_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&dir.path().join("init.sock"));
    let mut worker = Setup::start(|| setup::fake_hang()).unwrap();
    assert_eq!(
        rt.wait_for_setup(&mut worker, Duration::from_millis(200)),
        None
    );
    assert!(!worker.finished());
    assert!(worker.groups().is_empty());
    let pid = Pid::from_raw(worker.pid());
    kill(pid, Signal::SIGKILL).unwrap();
    waitpid(pid, None).unwrap();
}

#[test]
fn a_poweroff_asked_while_setup_fakes_a_hang_is_carried_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("init.sock");
    let mut rt = runtime(&socket);
    let mut worker = Setup::start(|| setup::fake_hang()).unwrap();
    ask(&socket, Request::Poweroff, |answer| {
        assert_eq!(answer, Response::Ok)
    });
    assert_eq!(
        rt.wait_for_setup(&mut worker, DEADLINE),
        Some(PowerAction::Poweroff)
    );
    let pid = Pid::from_raw(worker.pid());
    kill(pid, Signal::SIGKILL).unwrap();
    waitpid(pid, None).unwrap();
}
