//! Which socket to talk to: the root-only one, or for `ls` and `log`, when that one is out
//! of reach (not root), the read-only one of `[control] read_group`. The server's
//! credentials are checked (SO_PEERCRED: root) before anything is sent.

use std::path::Path;

use bulkhead_init::control::{
    Client, ClientError, Request, Response, READ_SOCKET_PATH, SOCKET_PATH,
};

use crate::CtlError;

/// A checked connection to init.
pub struct Conn {
    client: Client,
}

impl Conn {
    /// One request, one answer.
    pub fn call(&self, req: &Request) -> Result<Response, CtlError> {
        Ok(self.client.call(req)?)
    }
}

fn denied(e: &ClientError) -> bool {
    use bulkhead_ipc::ChannelError;
    matches!(
        e,
        ClientError::Channel {
            source: ChannelError::Sys {
                errno: nix::errno::Errno::EACCES | nix::errno::Errno::EPERM,
                ..
            },
            ..
        }
    )
}

/// Connects to `explicit`, or to the default socket for the request.
pub fn connect(explicit: Option<&Path>, read_only: bool) -> Result<Conn, CtlError> {
    if let Some(p) = explicit {
        return match Client::connect(p) {
            Ok(client) => Ok(Conn { client }),
            Err(e) if denied(&e) => Err(CtlError::Other(format!(
                "permission denied: {} is not yours to use (only root may change anything; \
                 ls and log are open to the group [control] read_group names, through {})",
                p.display(),
                READ_SOCKET_PATH
            ))),
            Err(e) => Err(e.into()),
        };
    }
    match Client::connect(Path::new(SOCKET_PATH)) {
        Ok(client) => Ok(Conn { client }),
        Err(e) if denied(&e) && read_only => match Client::connect(Path::new(READ_SOCKET_PATH)) {
            Ok(client) => Ok(Conn { client }),
            Err(e2) if denied(&e2) => Err(CtlError::Other(format!(
                "permission denied: {SOCKET_PATH} is root's and {READ_SOCKET_PATH} is for \
                 the group [control] read_group names"
            ))),
            Err(e2) => Err(CtlError::Other(format!("{e}; and {e2}"))),
        },
        Err(e) if denied(&e) => Err(CtlError::Other(format!(
            "permission denied: only root may change anything ({SOCKET_PATH} is root's)"
        ))),
        Err(e) => Err(e.into()),
    }
}
