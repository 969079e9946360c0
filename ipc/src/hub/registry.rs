//! The service registry: which running VM provides which service (one provider each).
//!
//! Registration is checked against the policy (`check_provide`) by the hub before it gets
//! here; the registry enforces that a service has one live provider at a time and forgets a
//! VM's services when the VM goes away.

use std::collections::HashMap;

use crate::hub::handles::VmIdx;

/// Service name → providing VM.
#[derive(Debug, Default)]
pub struct Registry {
    providers: HashMap<String, VmIdx>,
}

impl Registry {
    /// Registers `vm` as the provider of `service`. Registering again is a no-op; another
    /// live provider is an error.
    pub fn provide(&mut self, service: &str, vm: VmIdx) -> Result<(), VmIdx> {
        match self.providers.get(service) {
            Some(&other) if other != vm => Err(other),
            _ => {
                self.providers.insert(service.to_string(), vm);
                Ok(())
            }
        }
    }

    /// The live provider of `service`.
    pub fn provider_of(&self, service: &str) -> Option<VmIdx> {
        self.providers.get(service).copied()
    }

    /// Forgets every service of `vm`.
    pub fn forget_vm(&mut self, vm: VmIdx) {
        self.providers.retain(|_, v| *v != vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_provider_per_service() {
        let mut r = Registry::default();
        r.provide("wayland", 1).unwrap();
        r.provide("wayland", 1).unwrap();
        assert_eq!(r.provide("wayland", 2), Err(1));
        r.forget_vm(1);
        assert_eq!(r.provider_of("wayland"), None);
        r.provide("wayland", 2).unwrap();
        assert_eq!(r.provider_of("wayland"), Some(2));
    }
}
