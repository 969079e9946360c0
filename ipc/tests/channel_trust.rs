//! Control clients check who answers (SO_PEERCRED) before they trust an answer: a socket
//! another user put at the path is refused, the owner of a directory only it can write is
//! trusted there. Needs root (to run the server as another uid), like the rest of the tests
//! on this machine.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bulkhead_ipc::channel::{Channel, ChannelError, ChannelListener, TrustedServer};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};

/// Forks a server running as `uid` that listens at `path`, accepts one client and waits
/// for it to go away; returns once the socket exists.
fn server_as(uid: u32, path: &Path) -> nix::unistd::Pid {
    let _ = std::fs::remove_file(path);
    let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only makes system calls (setresuid, socket, bind, listen, accept,
    // read, write) and _exits.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            // SAFETY: integer arguments.
            unsafe { libc::setresuid(uid, uid, uid) };
            let code = match ChannelListener::bind(path, 0o666) {
                Ok(l) => {
                    let _ = nix::unistd::write(&ready_w, b"1");
                    let mut tries = 0;
                    loop {
                        match l.accept() {
                            Ok(c) => {
                                let _ = c.recv_frame();
                                break 0;
                            }
                            Err(_) if tries < 500 => {
                                tries += 1;
                                std::thread::sleep(std::time::Duration::from_millis(10));
                            }
                            Err(_) => break 1,
                        }
                    }
                }
                Err(_) => 2,
            };
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(&ready_r, &mut b);
            child
        }
    }
}

#[test]
fn a_server_of_another_uid_is_refused_unless_it_owns_the_directory() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("needs root to run a server as another uid");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // A directory anyone may write: uid 65534 put a socket there. Neither Root nor DirOwner
    // trust it.
    let path = dir.path().join("init.sock");
    for trust in [TrustedServer::Root, TrustedServer::DirOwner] {
        let server = server_as(65534, &path);
        let err = Channel::connect_trusted(&path, trust).unwrap_err();
        assert!(
            matches!(&err, ChannelError::UntrustedServer(m) if m.contains("uid 65534")),
            "{trust:?}: {err}"
        );
        let _ = waitpid(server, None);
    }
    // The hub's runtime directory: owned by the server's uid, writable by it alone.
    let own = dir.path().join("hub");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o750)).unwrap();
    let path = own.join("hub.sock");
    let server = server_as(65534, &path);
    let ch = Channel::connect_trusted(&path, TrustedServer::DirOwner).unwrap();
    drop(ch);
    let _ = waitpid(server, None);
    // …but init's client trusts root alone there too.
    let server = server_as(65534, &path);
    assert!(Channel::connect_trusted(&path, TrustedServer::Root).is_err());
    let _ = waitpid(server, None);
}
