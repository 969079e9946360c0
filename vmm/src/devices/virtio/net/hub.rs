//! The hub as the net device reaches it: through the one VM channel the VMM has, which the
//! virtio_wl device owns (`wl::hub::HubLink`). A connect or an allocation waits on that
//! channel while holding the virtio_wl state's lock, as the virtio_wl device's own requests
//! do; neither is on the data path.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use bulkhead_ipc::hub::client::HubConn;

use super::link::{lock, HubAccess};
use crate::devices::virtio::wl::hub::{parse_hub_name, HubName, Resolved};
use crate::devices::virtio::wl::state::WlState;

/// The VM channel of the virtio_wl device.
pub struct WlHub(pub Arc<Mutex<WlState>>);

/// Checks a `--net` name: `service@provider`.
pub fn check_service(name: &str) -> Result<(), String> {
    match parse_hub_name(name) {
        Ok(HubName::Connect(_, Some(_))) => Ok(()),
        _ => Err(format!(
            "{name:?} is not a service at a provider (SERVICE@VM, e.g. net@net-vm)"
        )),
    }
}

impl HubAccess for WlHub {
    fn connect(&mut self, name: &str) -> Result<HubConn, String> {
        let mut st = lock(&self.0);
        let hub = st.hub().ok_or("this VMM has no hub channel")?;
        match hub.resolve(name) {
            Ok(Resolved::Conn(c)) => Ok(c),
            Ok(Resolved::Listener { .. }) => Err(format!("{name} is not a connection")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn alloc_shm(&mut self, size: u64) -> Result<OwnedFd, String> {
        let mut st = lock(&self.0);
        let hub = st.hub().ok_or("this VMM has no hub channel")?;
        hub.alloc_shm(size).map_err(|e| e.to_string())
    }
}
