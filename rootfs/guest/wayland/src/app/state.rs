//! The protocol state of one client on the app side: every request and event is decoded
//! against the tables, objects are tracked, and the fd-carrying messages are translated.
//! Pure of I/O on the client socket and the connection: it turns one message into the
//! messages to send on (with their fds), or a [`Fault`] that ends this client alone.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use wayland_client::backend::protocol::{Interface, MessageDesc};

use super::shm::{self, Buffer, Pool, PoolMem, Surface};
use crate::objects::Objects;
use crate::pipes;
use crate::protocol::{self, FdRole, Verdict};
use crate::stats::Stats;
use crate::transport::Transport;
use crate::wire::{self, Arg, Header};

/// Largest shm pool a client may create (the VM's own shm quota applies too).
pub const MAX_POOL: usize = 256 << 20;
/// Largest blob (keymap) the proxy copies from the compositor.
pub const MAX_BLOB: usize = 16 << 20;

/// `wl_display.error` codes.
pub mod code {
    /// Unknown or wrong object.
    pub const INVALID_OBJECT: u32 = 0;
    /// Malformed request or unknown opcode.
    pub const INVALID_METHOD: u32 = 1;
    /// Out of memory.
    pub const NO_MEMORY: u32 = 2;
    /// The proxy cannot do it.
    pub const IMPLEMENTATION: u32 = 3;
    /// `wl_shm.error.invalid_fd`.
    pub const SHM_INVALID_FD: u32 = 2;
}

pub use crate::batch::Out;

/// What ends a client's session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The client broke the protocol: it gets `wl_display.error` and is disconnected.
    #[error("protocol error on object {object} (code {code}): {message}")]
    Protocol {
        /// The object the error is about.
        object: u32,
        /// The error code (of the object's interface, or wl_display's).
        code: u32,
        /// Why.
        message: String,
    },
    /// The compositor's side sent something that cannot be understood or translated.
    #[error("from the compositor: {0}")]
    Compositor(String),
}

fn perr(object: u32, code: u32, message: impl Into<String>) -> Fault {
    Fault::Protocol {
        object,
        code,
        message: message.into(),
    }
}

/// The `wl_display.error` event for a fault.
pub fn error_event(object: u32, code: u32, message: &str) -> Vec<u8> {
    wire::encode(
        1,
        0,
        &[
            Arg::Object(object),
            Arg::Uint(code),
            Arg::Str(Some(message.as_bytes())),
        ],
    )
}

/// One client's state.
pub struct ClientState {
    transport: Arc<dyn Transport>,
    stats: Arc<Stats>,
    objects: Objects,
    /// Globals announced to the client: name → (interface, version offered).
    globals: HashMap<u32, (&'static Interface, u32)>,
    pools: HashMap<u32, Pool>,
    buffers: HashMap<u32, Buffer>,
    surfaces: HashMap<u32, Surface>,
    /// `delete_id`s of objects the proxy destroyed itself (pool resize), not shown.
    swallow: HashMap<u32, u32>,
    /// Bytes copied for this client.
    pub copied: u64,
    /// Commits of this client.
    pub commits: u64,
}

struct Decoded<'a> {
    h: Header,
    iface: &'static Interface,
    desc: &'static MessageDesc,
    version: u32,
    args: Vec<Arg<'a>>,
    fds: Vec<OwnedFd>,
}

impl ClientState {
    /// A new client.
    pub fn new(transport: Arc<dyn Transport>, stats: Arc<Stats>) -> Self {
        Self {
            transport,
            stats,
            objects: Objects::new(),
            globals: HashMap::new(),
            pools: HashMap::new(),
            buffers: HashMap::new(),
            surfaces: HashMap::new(),
            swallow: HashMap::new(),
            copied: 0,
            commits: 0,
        }
    }

    /// The object map (for tests).
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    fn decode<'a>(
        &self,
        msg: &'a [u8],
        fds: &mut VecDeque<OwnedFd>,
        request: bool,
    ) -> Result<Decoded<'a>, Fault> {
        let bad = |object: u32, code: u32, m: String| {
            if request {
                perr(object, code, m)
            } else {
                Fault::Compositor(m)
            }
        };
        let h = match wire::header(msg) {
            Ok(Some(h)) if h.size == msg.len() => h,
            Ok(_) => return Err(bad(1, code::INVALID_METHOD, "bad message size".into())),
            Err(e) => return Err(bad(1, code::INVALID_METHOD, e.to_string())),
        };
        let obj = if request {
            self.objects.alive(h.object)
        } else {
            self.objects.get(h.object)
        };
        let Some(obj) = obj.copied() else {
            return Err(bad(
                h.object,
                code::INVALID_OBJECT,
                format!("unknown object {}", h.object),
            ));
        };
        let list = if request {
            obj.iface.requests
        } else {
            obj.iface.events
        };
        let Some(desc) = list.get(usize::from(h.opcode)) else {
            return Err(bad(
                h.object,
                code::INVALID_METHOD,
                format!(
                    "{} has no {} {}",
                    obj.iface.name,
                    if request { "request" } else { "event" },
                    h.opcode
                ),
            ));
        };
        let body = msg.get(wire::HEADER_LEN..).unwrap_or_default();
        let args = wire::parse_args(desc.signature, body).map_err(|e| {
            bad(
                h.object,
                code::INVALID_METHOD,
                format!("{}.{}: {e}", obj.iface.name, desc.name),
            )
        })?;
        let n = wire::fd_count(desc.signature);
        if fds.len() < n {
            return Err(bad(
                h.object,
                code::INVALID_METHOD,
                format!("{}.{}: missing fd", obj.iface.name, desc.name),
            ));
        }
        let fds: Vec<OwnedFd> = fds.drain(..n).collect();
        Ok(Decoded {
            h,
            iface: obj.iface,
            desc,
            version: obj.version,
            args,
            fds,
        })
    }

    /// Handles one complete request from the client; what goes on to the compositor is
    /// appended to `out`.
    pub fn request(
        &mut self,
        msg: &[u8],
        fds: &mut VecDeque<OwnedFd>,
        out: &mut Vec<Out>,
    ) -> Result<(), Fault> {
        let d = self.decode(msg, fds, true)?;
        let object = d.h.object;
        // Object arguments must be live objects of the right interface.
        let mut obj_args = d.desc.arg_interfaces.iter();
        for a in &d.args {
            if let Arg::Object(id) = a {
                let want = obj_args.next();
                if *id == 0 {
                    continue;
                }
                let Some(o) = self.objects.alive(*id) else {
                    return Err(perr(
                        *id,
                        code::INVALID_OBJECT,
                        format!("unknown object {id}"),
                    ));
                };
                if let Some(w) = want {
                    if w.name != "<anonymous>" && w.name != o.iface.name {
                        return Err(perr(
                            *id,
                            code::INVALID_OBJECT,
                            format!("object {id} is a {}, not a {}", o.iface.name, w.name),
                        ));
                    }
                }
            }
        }
        // A new object: its interface from the tables, or, for bind, the global's.
        if let Some(id) = d.args.iter().find_map(|a| match a {
            Arg::NewId(id) => Some(*id),
            _ => None,
        }) {
            let (iface, version) = match d.desc.child_interface {
                Some(c) => (c, d.version),
                None => self.bind_target(object, &d.args)?,
            };
            self.objects
                .create(id, iface, version, true)
                .map_err(|e| perr(object, code::INVALID_OBJECT, e.to_string()))?;
        }
        if d.desc.is_destructor {
            self.objects.destroy(object);
        }
        self.request_hook(d, msg, out)
    }

    /// `wl_registry.bind(name, interface, version, id)`: only announced globals, at most at
    /// the version offered.
    fn bind_target(
        &self,
        registry: u32,
        args: &[Arg<'_>],
    ) -> Result<(&'static Interface, u32), Fault> {
        let (Some(Arg::Uint(name)), Some(Arg::Str(Some(iface))), Some(Arg::Uint(version))) =
            (args.first(), args.get(1), args.get(2))
        else {
            return Err(perr(
                registry,
                code::INVALID_METHOD,
                "a new object of unknown interface",
            ));
        };
        match self.globals.get(name) {
            Some((i, v)) if i.name.as_bytes() == *iface && *version >= 1 && version <= v => {
                Ok((*i, *version))
            }
            _ => Err(perr(
                registry,
                code::INVALID_OBJECT,
                format!(
                    "invalid global {} ({name}) version {version}",
                    String::from_utf8_lossy(iface)
                ),
            )),
        }
    }

    fn request_hook(
        &mut self,
        d: Decoded<'_>,
        msg: &[u8],
        out: &mut Vec<Out>,
    ) -> Result<(), Fault> {
        let object = d.h.object;
        let int = |i: usize| match d.args.get(i) {
            Some(Arg::Int(v)) => *v,
            Some(Arg::Uint(v)) => *v as i32,
            _ => 0,
        };
        let id_at = |i: usize| match d.args.get(i) {
            Some(Arg::NewId(v)) | Some(Arg::Object(v)) => *v,
            _ => 0,
        };
        let forward = |out: &mut Vec<Out>, fds: Vec<OwnedFd>| {
            out.push(Out {
                bytes: msg.to_vec(),
                fds,
            })
        };
        let role = protocol::fd_role(d.iface.name, d.desc.name);
        match (d.iface.name, d.desc.name) {
            ("wl_shm", "create_pool") => {
                let (id, size) = (id_at(0), int(2));
                let client = d
                    .fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| perr(object, code::INVALID_METHOD, "missing fd"))?;
                let (vfd, mem) = self.new_pool_mem(object, client, size)?;
                self.pools.insert(
                    id,
                    Pool {
                        mem: Rc::new(mem),
                        size: size as usize,
                        shm: object,
                    },
                );
                forward(out, vec![vfd]);
            }
            ("wl_shm_pool", "create_buffer") => {
                if let Some(p) = self.pools.get(&object) {
                    let b =
                        Buffer::new(p.mem.clone(), int(1), int(2), int(3), int(4), int(5) as u32);
                    self.buffers.insert(id_at(0), b);
                }
                forward(out, vec![]);
            }
            ("wl_shm_pool", "resize") => self.resize_pool(object, int(0), out)?,
            ("wl_shm_pool", "destroy") => {
                self.pools.remove(&object);
                forward(out, vec![]);
            }
            ("wl_buffer", "destroy") => {
                self.buffers.remove(&object);
                for s in self.surfaces.values_mut() {
                    s.forget_buffer(object);
                }
                forward(out, vec![]);
            }
            ("wl_compositor", "create_surface") => {
                self.surfaces.insert(id_at(0), Surface::default());
                forward(out, vec![]);
            }
            ("wl_surface", "destroy") => {
                self.surfaces.remove(&object);
                forward(out, vec![]);
            }
            ("wl_surface", "attach") => {
                if let Some(s) = self.surfaces.get_mut(&object) {
                    let b = id_at(0);
                    s.attach((b != 0).then_some(b));
                }
                forward(out, vec![]);
            }
            ("wl_surface", "damage") | ("wl_surface", "damage_buffer") => {
                if let Some(s) = self.surfaces.get_mut(&object) {
                    let (x, y, w, h) = (int(0), int(1), int(2), int(3));
                    if d.desc.name == "damage" {
                        s.damage(x, y, w, h);
                    } else {
                        s.damage_buffer(x, y, w, h);
                    }
                }
                forward(out, vec![]);
            }
            ("wl_surface", "set_buffer_scale") => {
                if let Some(s) = self.surfaces.get_mut(&object) {
                    s.set_scale(int(0));
                }
                forward(out, vec![]);
            }
            ("wl_surface", "set_buffer_transform") => {
                if let Some(s) = self.surfaces.get_mut(&object) {
                    s.set_transform(int(0));
                }
                forward(out, vec![]);
            }
            ("wl_surface", "commit") => {
                if let Some(s) = self.surfaces.get_mut(&object) {
                    let n = shm::commit(object, s, &mut self.buffers)
                        .map_err(|e| perr(object, code::IMPLEMENTATION, e.to_string()))?;
                    self.copied += n;
                    self.commits += 1;
                    self.stats.commit(n);
                }
                forward(out, vec![]);
            }
            ("wp_viewporter", "get_viewport") => {
                if let Some(s) = self.surfaces.get_mut(&id_at(1)) {
                    s.viewport = true;
                }
                forward(out, vec![]);
            }
            _ => match role {
                None if d.fds.is_empty() => forward(out, vec![]),
                Some(FdRole::PipeWriteEnd) => {
                    // The client's write end stays here; the peer gets a virtio_wl pipe's.
                    let client = d
                        .fds
                        .into_iter()
                        .next()
                        .ok_or_else(|| perr(object, code::INVALID_METHOD, "missing fd"))?;
                    let p = self
                        .transport
                        .pipe_from_peer()
                        .map_err(|e| perr(1, code::NO_MEMORY, format!("no pipe: {e}")))?;
                    pipes::splice(
                        "transfer to the client",
                        p.local,
                        Box::new(std::fs::File::from(client)),
                    );
                    forward(out, vec![p.remote]);
                }
                _ => {
                    return Err(perr(
                        object,
                        code::IMPLEMENTATION,
                        format!(
                            "{}.{} carries an fd the proxy cannot translate",
                            d.iface.name, d.desc.name
                        ),
                    ))
                }
            },
        }
        Ok(())
    }

    fn new_pool_mem(
        &self,
        shm: u32,
        client: OwnedFd,
        size: i32,
    ) -> Result<(OwnedFd, PoolMem), Fault> {
        let size = usize::try_from(size)
            .ok()
            .filter(|s| *s > 0 && *s <= MAX_POOL)
            .ok_or_else(|| {
                perr(
                    shm,
                    code::SHM_INVALID_FD,
                    format!("invalid pool size {size}"),
                )
            })?;
        match nix::sys::stat::fstat(client.as_fd()) {
            Ok(st)
                if st.st_mode & libc::S_IFMT == libc::S_IFREG
                    && st.st_size as u64 >= size as u64 => {}
            Ok(_) => {
                return Err(perr(
                    shm,
                    code::SHM_INVALID_FD,
                    "the pool fd is not a file of at least the pool's size",
                ))
            }
            Err(e) => return Err(perr(shm, code::SHM_INVALID_FD, format!("the pool fd: {e}"))),
        }
        let (vfd, map) = self.transport.alloc(size).map_err(|e| {
            perr(
                1,
                code::NO_MEMORY,
                format!("no shared memory for a {size}-byte pool: {e}"),
            )
        })?;
        Ok((vfd, PoolMem { client, map }))
    }

    /// `wl_shm_pool.resize`: virtio_wl memory cannot grow, so the proxy destroys the
    /// compositor's pool and makes a new one of the new size under the same id (the
    /// compositor frees the id at once; its `delete_id` is not shown to the client).
    /// Buffers made before keep the old memory, as they do in the compositor.
    fn resize_pool(&mut self, pool: u32, size: i32, out: &mut Vec<Out>) -> Result<(), Fault> {
        let Some(p) = self.pools.get(&pool) else {
            return Err(perr(pool, code::INVALID_OBJECT, "unknown pool"));
        };
        if size < 0 || (size as usize) < p.size {
            return Err(perr(
                pool,
                code::SHM_INVALID_FD,
                format!("shrinking pool to {size}"),
            ));
        }
        if size as usize == p.size {
            return Ok(());
        }
        let shm = if self
            .objects
            .alive(p.shm)
            .is_some_and(|o| o.iface.name == "wl_shm")
        {
            p.shm
        } else {
            return Err(perr(
                pool,
                code::IMPLEMENTATION,
                "pool resize after the wl_shm was released is not supported",
            ));
        };
        let client = p
            .mem
            .client
            .try_clone()
            .map_err(|e| perr(1, code::NO_MEMORY, e.to_string()))?;
        let (vfd, mem) = self.new_pool_mem(shm, client, size)?;
        let pool_if = protocol::interface("wl_shm_pool");
        let shm_if = protocol::interface("wl_shm");
        let (Some((destroy, _)), Some((create, _))) = (
            pool_if.and_then(|i| protocol::message_named(i.requests, "destroy")),
            shm_if.and_then(|i| protocol::message_named(i.requests, "create_pool")),
        ) else {
            return Err(perr(
                pool,
                code::IMPLEMENTATION,
                "no wl_shm_pool.destroy in the tables",
            ));
        };
        out.push(Out {
            bytes: wire::encode(pool, destroy, &[]),
            fds: vec![],
        });
        out.push(Out {
            bytes: wire::encode(shm, create, &[Arg::NewId(pool), Arg::Fd, Arg::Int(size)]),
            fds: vec![vfd],
        });
        *self.swallow.entry(pool).or_default() += 1;
        if let Some(p) = self.pools.get_mut(&pool) {
            p.mem = Rc::new(mem);
            p.size = size as usize;
        }
        Ok(())
    }

    /// Handles one complete event from the compositor; what goes on to the client is
    /// appended to `out`.
    pub fn event(
        &mut self,
        msg: &[u8],
        fds: &mut VecDeque<OwnedFd>,
        out: &mut Vec<Out>,
    ) -> Result<(), Fault> {
        let d = self.decode(msg, fds, false)?;
        let object = d.h.object;
        if let Some(child) = d.desc.child_interface {
            if let Some(id) = d.args.iter().find_map(|a| match a {
                Arg::NewId(id) => Some(*id),
                _ => None,
            }) {
                self.objects
                    .create(id, child, d.version, false)
                    .map_err(|e| Fault::Compositor(e.to_string()))?;
            }
        }
        if d.desc.is_destructor {
            self.objects.destroy(object);
        }
        let forward = |out: &mut Vec<Out>, fds: Vec<OwnedFd>| {
            out.push(Out {
                bytes: msg.to_vec(),
                fds,
            })
        };
        match (d.iface.name, d.desc.name) {
            ("wl_display", "delete_id") => {
                let Some(Arg::Uint(id)) = d.args.first().copied() else {
                    return Err(Fault::Compositor("bad delete_id".into()));
                };
                if let Some(n) = self.swallow.get_mut(&id).filter(|n| **n > 0) {
                    *n -= 1;
                    return Ok(());
                }
                self.objects.delete(id);
                self.pools.remove(&id);
                self.buffers.remove(&id);
                self.surfaces.remove(&id);
                forward(out, vec![]);
            }
            ("wl_registry", "global") => {
                let (Some(Arg::Uint(name)), Some(Arg::Str(Some(iface))), Some(Arg::Uint(version))) = (
                    d.args.first().copied(),
                    d.args.get(1).copied(),
                    d.args.get(2).copied(),
                ) else {
                    return Err(Fault::Compositor("bad global".into()));
                };
                let iname = String::from_utf8_lossy(iface);
                match protocol::global_verdict(&iname) {
                    Verdict::Serve(i) => {
                        let v = version.min(i.version);
                        self.globals.insert(name, (i, v));
                        out.push(Out {
                            bytes: wire::encode(
                                object,
                                d.h.opcode,
                                &[Arg::Uint(name), Arg::Str(Some(iface)), Arg::Uint(v)],
                            ),
                            fds: vec![],
                        });
                    }
                    Verdict::Hide(why) => log::debug!("hiding global {iname}: {why}"),
                }
            }
            ("wl_registry", "global_remove") => {
                if let Some(Arg::Uint(name)) = d.args.first() {
                    if self.globals.remove(name).is_some() {
                        forward(out, vec![]);
                    }
                }
            }
            _ => match protocol::fd_role(d.iface.name, d.desc.name) {
                None if d.fds.is_empty() => forward(out, vec![]),
                Some(FdRole::Blob) => {
                    let size = d.args.iter().rev().find_map(|a| match a {
                        Arg::Uint(v) => Some(*v as usize),
                        _ => None,
                    });
                    let vfd = d.fds.into_iter().next();
                    let (Some(size), Some(vfd)) = (size, vfd) else {
                        return Err(Fault::Compositor("keymap without fd or size".into()));
                    };
                    let local = self.copy_blob(vfd, size)?;
                    forward(out, vec![local]);
                }
                Some(FdRole::PipeWriteEnd) => {
                    let Some(vfd) = d.fds.into_iter().next() else {
                        return Err(Fault::Compositor("transfer without fd".into()));
                    };
                    let (r, w) =
                        crate::sock::pipe().map_err(|e| Fault::Compositor(e.to_string()))?;
                    pipes::splice(
                        "transfer from the client",
                        Box::new(std::fs::File::from(r)),
                        self.transport.received_pipe_writer(vfd),
                    );
                    forward(out, vec![w]);
                }
                _ => {
                    return Err(Fault::Compositor(format!(
                        "{}.{} carries an fd the proxy cannot translate",
                        d.iface.name, d.desc.name
                    )))
                }
            },
        }
        Ok(())
    }

    /// A blob from the compositor (a keymap): the proxy gives the client a sealed memfd with
    /// the same bytes.
    fn copy_blob(&self, vfd: OwnedFd, size: usize) -> Result<OwnedFd, Fault> {
        let err = |e: std::io::Error| Fault::Compositor(format!("keymap of {size} bytes: {e}"));
        if size > MAX_BLOB {
            return Err(Fault::Compositor(format!("a keymap of {size} bytes")));
        }
        // SAFETY: a static NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"bulkhead-wl-blob".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: a new fd nothing else owns.
        let local = unsafe { OwnedFd::from_raw_fd(fd) };
        if size > 0 {
            let map = self
                .transport
                .map_received(vfd.as_fd(), size)
                .map_err(err)?;
            map.write_to(size, local.as_fd()).map_err(err)?;
        }
        self.stats
            .blob_bytes
            .fetch_add(size as u64, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: F_ADD_SEALS on an fd we own.
        unsafe {
            libc::fcntl(
                local.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL,
            )
        };
        Ok(local)
    }
}
