//! The objects of one client connection: id → interface and version, with the Wayland
//! rules for ids (clients allocate below 0xff000000, the compositor above; a client id is
//! free again only after the compositor's `wl_display.delete_id`).

use std::collections::HashMap;

use wayland_client::backend::protocol::Interface;

use crate::protocol;
use crate::wire::SERVER_ID_START;

/// Most objects one client may have (bounds the proxy's memory per client).
pub const MAX_OBJECTS: usize = 65_536;

/// One object.
#[derive(Debug, Clone, Copy)]
pub struct Object {
    /// Its interface, from the tables.
    pub iface: &'static Interface,
    /// Its version.
    pub version: u32,
    /// False once destroyed (a zombie until its id is deleted: events may still come).
    pub alive: bool,
}

/// Why an id cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is in use (or not yet deleted).
    #[error("id {0} is already in use")]
    InUse(u32),
    /// The id is in the other side's range.
    #[error("id {0} is outside the range of its creator")]
    WrongRange(u32),
    /// Too many objects.
    #[error("too many objects")]
    TooMany,
}

/// The object map of one connection.
pub struct Objects {
    map: HashMap<u32, Object>,
}

impl Default for Objects {
    fn default() -> Self {
        Self::new()
    }
}

impl Objects {
    /// A new connection: only `wl_display` (id 1).
    pub fn new() -> Self {
        let mut map = HashMap::new();
        map.insert(
            1,
            Object {
                iface: protocol::display(),
                version: 1,
                alive: true,
            },
        );
        Self { map }
    }

    /// The object `id`, alive or a zombie.
    pub fn get(&self, id: u32) -> Option<&Object> {
        self.map.get(&id)
    }

    /// A live object.
    pub fn alive(&self, id: u32) -> Option<&Object> {
        self.map.get(&id).filter(|o| o.alive)
    }

    /// Records a new object. `by_client`: created by a request (client range), else by an
    /// event (compositor range, which may reuse the id of a dead object).
    pub fn create(
        &mut self,
        id: u32,
        iface: &'static Interface,
        version: u32,
        by_client: bool,
    ) -> Result<(), IdError> {
        if by_client {
            if id == 0 || id >= SERVER_ID_START {
                return Err(IdError::WrongRange(id));
            }
            if self.map.contains_key(&id) {
                return Err(IdError::InUse(id));
            }
        } else {
            if id < SERVER_ID_START {
                return Err(IdError::WrongRange(id));
            }
            if self.map.get(&id).is_some_and(|o| o.alive) {
                return Err(IdError::InUse(id));
            }
        }
        if self.map.len() >= MAX_OBJECTS {
            return Err(IdError::TooMany);
        }
        self.map.insert(
            id,
            Object {
                iface,
                version,
                alive: true,
            },
        );
        Ok(())
    }

    /// Marks `id` destroyed. A compositor-range id is kept as a zombie until reused; a
    /// client-range one until `delete_id`.
    pub fn destroy(&mut self, id: u32) {
        if let Some(o) = self.map.get_mut(&id) {
            o.alive = false;
        }
    }

    /// `wl_display.delete_id`: the client id is free again.
    pub fn delete(&mut self, id: u32) {
        if id < SERVER_ID_START && id != 1 {
            self.map.remove(&id);
        }
    }

    /// How many objects (alive and zombies).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never: wl_display is always there.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_reused_only_after_delete_id() {
        let reg = protocol::interface("wl_registry").unwrap();
        let mut o = Objects::new();
        o.create(2, reg, 1, true).unwrap();
        assert_eq!(o.create(2, reg, 1, true), Err(IdError::InUse(2)));
        o.destroy(2);
        assert!(o.alive(2).is_none());
        assert!(o.get(2).is_some(), "a zombie until delete_id");
        assert_eq!(o.create(2, reg, 1, true), Err(IdError::InUse(2)));
        o.delete(2);
        o.create(2, reg, 1, true).unwrap();
        assert_eq!(
            o.create(SERVER_ID_START, reg, 1, true),
            Err(IdError::WrongRange(SERVER_ID_START))
        );
        assert_eq!(o.create(5, reg, 1, false), Err(IdError::WrongRange(5)));
        o.create(SERVER_ID_START, reg, 1, false).unwrap();
        o.destroy(SERVER_ID_START);
        o.create(SERVER_ID_START, reg, 1, false).unwrap();
        o.delete(1);
        assert!(o.alive(1).is_some(), "wl_display stays");
    }
}
