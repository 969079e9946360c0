//! The protocol tables and what the proxy serves.
//!
//! Every message signature comes from the Wayland protocol XML files, through the tables
//! `wayland-scanner` generates from them at build time (`wayland-client` carries the core
//! protocol, `wayland-protocols` xdg-shell and the stable, staging and unstable protocols).
//! Nothing here types a signature by hand: this module only says which *globals* the proxy
//! offers a client, and what the fd of each fd-carrying message *is* (its role), so it can be
//! translated.
//!
//! A global is served when its interface is in [`KNOWN_GLOBALS`] and every fd argument of
//! every message reachable from it (through `new_id`s) has a role in [`fd_role`]. Everything
//! else is hidden from clients: `zwp_linux_dmabuf_v1` and the explicit-synchronization
//! protocols (dmabufs and fences cannot cross virtio_wl here), `wp_security_context_v1`
//! (listening sockets), input-method keymaps, and any interface the tables do not know
//! (`wl_drm`, weston's private protocols).

use std::collections::HashMap;
use std::sync::OnceLock;

use wayland_client::backend::protocol::{ArgumentType, Interface, MessageDesc};

use wayland_client::protocol::__interfaces as core;
use wayland_protocols::wp;
use wayland_protocols::xdg;

/// What an fd argument is, which decides how it crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdRole {
    /// `wl_shm.create_pool`: the client's pool memory. Becomes virtio_wl shared memory that
    /// the proxy fills from the client's memory at each commit (damaged rectangles only).
    ShmPool,
    /// A read-only blob from the compositor (`wl_keyboard.keymap`): copied once.
    Blob,
    /// The write end of a pipe for a data transfer (clipboard, primary selection, drag and
    /// drop): a virtio_wl pipe, with the data spliced through the proxy.
    PipeWriteEnd,
}

/// The role of the fd of `interface.message`, if the proxy can translate it.
pub fn fd_role(interface: &str, message: &str) -> Option<FdRole> {
    match (interface, message) {
        ("wl_shm", "create_pool") => Some(FdRole::ShmPool),
        ("wl_keyboard", "keymap") => Some(FdRole::Blob),
        ("wl_data_offer", "receive")
        | ("wl_data_source", "send")
        | ("zwp_primary_selection_offer_v1", "receive")
        | ("zwp_primary_selection_source_v1", "send") => Some(FdRole::PipeWriteEnd),
        _ => None,
    }
}

/// The globals the proxy knows: the core protocol's, xdg-shell and the common stable,
/// staging and unstable ones. Interfaces that only objects of these create are found by
/// following `new_id`s. Some are here only to be hidden by the fd rule (dmabuf, fences).
pub static KNOWN_GLOBALS: &[&Interface] = &[
    &core::WL_COMPOSITOR_INTERFACE,
    &core::WL_SUBCOMPOSITOR_INTERFACE,
    &core::WL_SHM_INTERFACE,
    &core::WL_SEAT_INTERFACE,
    &core::WL_OUTPUT_INTERFACE,
    &core::WL_DATA_DEVICE_MANAGER_INTERFACE,
    &core::WL_SHELL_INTERFACE,
    &xdg::shell::client::__interfaces::XDG_WM_BASE_INTERFACE,
    &xdg::xdg_output::zv1::client::__interfaces::ZXDG_OUTPUT_MANAGER_V1_INTERFACE,
    &xdg::decoration::zv1::client::__interfaces::ZXDG_DECORATION_MANAGER_V1_INTERFACE,
    &xdg::activation::v1::client::__interfaces::XDG_ACTIVATION_V1_INTERFACE,
    &xdg::dialog::v1::client::__interfaces::XDG_WM_DIALOG_V1_INTERFACE,
    &wp::viewporter::client::__interfaces::WP_VIEWPORTER_INTERFACE,
    &wp::presentation_time::client::__interfaces::WP_PRESENTATION_INTERFACE,
    &wp::primary_selection::zv1::client::__interfaces::ZWP_PRIMARY_SELECTION_DEVICE_MANAGER_V1_INTERFACE,
    &wp::relative_pointer::zv1::client::__interfaces::ZWP_RELATIVE_POINTER_MANAGER_V1_INTERFACE,
    &wp::pointer_constraints::zv1::client::__interfaces::ZWP_POINTER_CONSTRAINTS_V1_INTERFACE,
    &wp::pointer_gestures::zv1::client::__interfaces::ZWP_POINTER_GESTURES_V1_INTERFACE,
    &wp::input_timestamps::zv1::client::__interfaces::ZWP_INPUT_TIMESTAMPS_MANAGER_V1_INTERFACE,
    &wp::idle_inhibit::zv1::client::__interfaces::ZWP_IDLE_INHIBIT_MANAGER_V1_INTERFACE,
    &wp::keyboard_shortcuts_inhibit::zv1::client::__interfaces::ZWP_KEYBOARD_SHORTCUTS_INHIBIT_MANAGER_V1_INTERFACE,
    &wp::text_input::zv1::client::__interfaces::ZWP_TEXT_INPUT_MANAGER_V1_INTERFACE,
    &wp::text_input::zv3::client::__interfaces::ZWP_TEXT_INPUT_MANAGER_V3_INTERFACE,
    &wp::tablet::zv2::client::__interfaces::ZWP_TABLET_MANAGER_V2_INTERFACE,
    &wp::single_pixel_buffer::v1::client::__interfaces::WP_SINGLE_PIXEL_BUFFER_MANAGER_V1_INTERFACE,
    &wp::fractional_scale::v1::client::__interfaces::WP_FRACTIONAL_SCALE_MANAGER_V1_INTERFACE,
    &wp::cursor_shape::v1::client::__interfaces::WP_CURSOR_SHAPE_MANAGER_V1_INTERFACE,
    &wp::tearing_control::v1::client::__interfaces::WP_TEARING_CONTROL_MANAGER_V1_INTERFACE,
    &wp::content_type::v1::client::__interfaces::WP_CONTENT_TYPE_MANAGER_V1_INTERFACE,
    &wp::fullscreen_shell::zv1::client::__interfaces::ZWP_FULLSCREEN_SHELL_V1_INTERFACE,
    // Known so that the fd rule hides them (dmabufs, fences, listening sockets, keymaps of
    // an input method): never served.
    &wp::linux_dmabuf::zv1::client::__interfaces::ZWP_LINUX_DMABUF_V1_INTERFACE,
    &wp::linux_explicit_synchronization::zv1::client::__interfaces::ZWP_LINUX_EXPLICIT_SYNCHRONIZATION_V1_INTERFACE,
    &wp::linux_drm_syncobj::v1::client::__interfaces::WP_LINUX_DRM_SYNCOBJ_MANAGER_V1_INTERFACE,
    &wp::security_context::v1::client::__interfaces::WP_SECURITY_CONTEXT_MANAGER_V1_INTERFACE,
    &wp::input_method::zv1::client::__interfaces::ZWP_INPUT_METHOD_V1_INTERFACE,
];

/// The interface of object 1.
pub fn display() -> &'static Interface {
    &core::WL_DISPLAY_INTERFACE
}

/// Whether a global is offered to clients.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Offered, at most at this version (the lower of the compositor's and the tables').
    Serve(&'static Interface),
    /// Hidden, and why.
    Hide(String),
}

struct Tables {
    /// Every interface reachable from wl_display and the known globals, by name.
    by_name: HashMap<&'static str, &'static Interface>,
    /// Why a known global is not served (an fd without a role somewhere below it).
    unservable: HashMap<&'static str, String>,
}

fn children(i: &'static Interface) -> impl Iterator<Item = &'static Interface> {
    i.requests
        .iter()
        .chain(i.events.iter())
        .flat_map(|m: &'static MessageDesc| {
            m.child_interface
                .into_iter()
                .chain(m.arg_interfaces.iter().copied())
        })
        .filter(|c| c.name != "<anonymous>")
}

/// The first fd argument below `root` (following `new_id`s) that has no role.
fn untranslatable_fd(root: &'static Interface) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![root];
    while let Some(i) = todo.pop() {
        if !seen.insert(i.name) {
            continue;
        }
        for m in i.requests.iter().chain(i.events.iter()) {
            if m.signature.contains(&ArgumentType::Fd) && fd_role(i.name, m.name).is_none() {
                return Some(format!("{}.{} carries an fd", i.name, m.name));
            }
        }
        // Only interfaces this one creates are reachable from it; objects it merely names
        // (a wl_surface argument) belong to another global.
        for m in i.requests.iter().chain(i.events.iter()) {
            if let Some(c) = m.child_interface {
                todo.push(c);
            }
        }
    }
    None
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut by_name = HashMap::new();
        let mut todo: Vec<&'static Interface> = vec![display()];
        todo.extend(KNOWN_GLOBALS.iter().copied());
        while let Some(i) = todo.pop() {
            if by_name.insert(i.name, i).is_none() {
                todo.extend(children(i));
            }
        }
        let unservable = KNOWN_GLOBALS
            .iter()
            .filter_map(|g| untranslatable_fd(g).map(|why| (g.name, why)))
            .collect();
        Tables {
            by_name,
            unservable,
        }
    })
}

/// The interface called `name` in the tables.
pub fn interface(name: &str) -> Option<&'static Interface> {
    tables().by_name.get(name).copied()
}

/// Whether the global `name` is offered to clients.
pub fn global_verdict(name: &str) -> Verdict {
    let t = tables();
    if !KNOWN_GLOBALS.iter().any(|g| g.name == name) {
        return Verdict::Hide("not an interface the proxy knows".into());
    }
    if let Some(why) = t.unservable.get(name) {
        return Verdict::Hide(format!("cannot be translated ({why})"));
    }
    match t.by_name.get(name) {
        Some(i) => Verdict::Serve(i),
        None => Verdict::Hide("not an interface the proxy knows".into()),
    }
}

/// The request or event called `name` on `i`, with its opcode.
pub fn message_named(
    list: &'static [MessageDesc],
    name: &str,
) -> Option<(u16, &'static MessageDesc)> {
    list.iter()
        .enumerate()
        .find(|(_, m)| m.name == name)
        .and_then(|(n, m)| u16::try_from(n).ok().map(|n| (n, m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_come_from_the_xml_tables() {
        let reg = interface("wl_registry").unwrap();
        // bind's new_id without an interface expands to (string, version, id).
        let (op, bind) = message_named(reg.requests, "bind").unwrap();
        assert_eq!(op, 0);
        assert_eq!(bind.signature.len(), 4);
        let shm = interface("wl_shm").unwrap();
        let (_, cp) = message_named(shm.requests, "create_pool").unwrap();
        assert!(cp.signature.contains(&ArgumentType::Fd));
        assert_eq!(cp.child_interface.map(|i| i.name), Some("wl_shm_pool"));
        assert!(
            interface("xdg_toplevel").is_some(),
            "reached through xdg_wm_base"
        );
        assert!(interface("zwp_primary_selection_offer_v1").is_some());
    }

    #[test]
    fn the_proxy_serves_what_stock_clients_need_and_hides_dmabuf_and_unknowns() {
        for g in [
            "wl_compositor",
            "wl_shm",
            "wl_seat",
            "wl_output",
            "wl_data_device_manager",
            "xdg_wm_base",
            "zwp_primary_selection_device_manager_v1",
            "wp_viewporter",
            "wl_subcompositor",
        ] {
            assert!(
                matches!(global_verdict(g), Verdict::Serve(_)),
                "{g}: {:?}",
                global_verdict(g)
            );
        }
        for g in [
            "zwp_linux_dmabuf_v1",
            "zwp_linux_explicit_synchronization_v1",
            "wp_security_context_manager_v1",
            "wl_drm",
            "weston_screenshooter",
            "wl_display",
            "wl_registry",
        ] {
            assert!(
                matches!(global_verdict(g), Verdict::Hide(_)),
                "{g} must be hidden"
            );
        }
        let Verdict::Hide(why) = global_verdict("zwp_linux_dmabuf_v1") else {
            unreachable!()
        };
        assert!(why.contains("fd"), "{why}");
    }

    #[test]
    fn every_served_fd_has_a_role() {
        for g in KNOWN_GLOBALS {
            if let Verdict::Serve(i) = global_verdict(g.name) {
                assert_eq!(untranslatable_fd(i), None);
            }
        }
    }
}
