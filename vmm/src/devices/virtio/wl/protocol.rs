//! The virtio_wl wire format: parsing of the commands the guest puts on the out queue and
//! encoding of the responses and of the messages the device puts on the in queue.
//!
//! Parsing works on the readable bytes of one descriptor chain, already gathered into a slice,
//! so it is pure, bounds-checked and fuzzable (`vmm/fuzz`). Every malformed command maps to the
//! response code the guest expects (`ResponseCode`); nothing here panics. All multi-byte
//! fields are little-endian. Layouts are described in docs/virtio_wl.md.

/// Virtio device ID of virtio_wl (ChromiumOS-private).
pub const VIRTIO_ID_WL: u32 = 63;

/// Feature bit 1: vfd flags mean READ/WRITE direction.
pub const VIRTIO_WL_F_TRANS_FLAGS: u64 = 1 << 1;
/// Feature bit 2: SEND_FOREIGN_ID uses 16-byte entries (not offered by Bulkhead).
pub const VIRTIO_WL_F_SEND_FENCES: u64 = 1 << 2;
/// Feature bit 3: PFNs are offsets into shared-memory region 0.
pub const VIRTIO_WL_F_USE_SHMEM: u64 = 1 << 3;

/// Command: allocate shared memory (out queue) / announce a host vfd (in queue).
pub const CMD_VFD_NEW: u32 = 0x100;
/// Command: close a vfd.
pub const CMD_VFD_CLOSE: u32 = 0x101;
/// Command: send data and vfds on a vfd.
pub const CMD_VFD_SEND: u32 = 0x102;
/// In-queue message: data and vfds received on a vfd.
pub const CMD_VFD_RECV: u32 = 0x103;
/// Command: connect to the unnamed socket.
pub const CMD_VFD_NEW_CTX: u32 = 0x104;
/// Command: create a pipe.
pub const CMD_VFD_NEW_PIPE: u32 = 0x105;
/// In-queue message: the host end hung up.
pub const CMD_VFD_HUP: u32 = 0x106;
/// Command: allocate a dmabuf (unsupported: INVALID_CMD).
pub const CMD_VFD_NEW_DMABUF: u32 = 0x107;
/// Command: dmabuf sync (unsupported: INVALID_CMD).
pub const CMD_VFD_DMABUF_SYNC: u32 = 0x108;
/// Command: send with typed vfd entries.
pub const CMD_VFD_SEND_FOREIGN_ID: u32 = 0x109;
/// Command: connect to a named socket.
pub const CMD_VFD_NEW_CTX_NAMED: u32 = 0x10a;

/// Response: success.
pub const RESP_OK: u32 = 0x1000;
/// Response: a new vfd.
pub const RESP_VFD_NEW: u32 = 0x1001;
/// Response: a new dmabuf vfd (never sent by Bulkhead).
pub const RESP_VFD_NEW_DMABUF: u32 = 0x1002;
/// Response: generic error (guest: ENODEV).
pub const RESP_ERR: u32 = 0x1100;
/// Response: out of memory (guest: ENOMEM).
pub const RESP_OUT_OF_MEMORY: u32 = 0x1101;
/// Response: unknown or reserved vfd id (guest: ENOENT).
pub const RESP_INVALID_ID: u32 = 0x1102;
/// Response: operation not valid for this vfd type (guest: EINVAL).
pub const RESP_INVALID_TYPE: u32 = 0x1103;
/// Response: bad flags (guest: EPERM).
pub const RESP_INVALID_FLAGS: u32 = 0x1104;
/// Response: malformed or unsupported command (guest: ENOTTY).
pub const RESP_INVALID_CMD: u32 = 0x1105;

/// vfd flag: the guest writes (TRANS_FLAGS) / the mapping is writable (legacy).
pub const VFD_WRITE: u32 = 0x1;
/// vfd flag: the guest reads (TRANS_FLAGS) / fixed-size mapping (legacy MAP).
pub const VFD_READ: u32 = 0x2;
/// Legacy name of `VFD_READ`.
pub const VFD_MAP: u32 = 0x2;
/// Legacy flag: the vfd can carry vfds.
pub const VFD_CONTROL: u32 = 0x4;
/// vfd flag: a fence.
pub const VFD_FENCE: u32 = 0x8;

/// Host-allocated vfd ids have this bit set.
pub const VFD_HOST_ID_BIT: u32 = 0x4000_0000;
/// Ids with this bit are invalid in both directions.
pub const VFD_ID_INVALID_BIT: u32 = 0x8000_0000;
/// At most this many vfds in one SEND or RECV.
pub const MAX_VFDS_PER_MESSAGE: usize = 28;
/// Size of the buffers the guest posts on the in queue.
pub const IN_BUFFER_SIZE: usize = 4096;
/// Largest RECV payload: one in-queue buffer minus the header and 28 ids.
pub const MAX_RECV_DATA: usize = IN_BUFFER_SIZE - RECV_HEADER_SIZE - 4 * MAX_VFDS_PER_MESSAGE;
/// Largest command the device accepts from the out queue (header, ids and payload).
pub const MAX_COMMAND_SIZE: usize = 1 << 20;
/// Longest socket name.
pub const CTX_NAME_MAX_LEN: usize = 32;
/// PFNs are always in 4 KiB units.
pub const PFN_SHIFT: u32 = 12;

/// ctrl_hdr size.
pub const HEADER_SIZE: usize = 8;
/// ctrl_vfd (CLOSE, HUP) size.
pub const VFD_MSG_SIZE: usize = 12;
/// vfd_new size as the device writes it (RESP_VFD_NEW, in-queue VFD_NEW).
pub const VFD_NEW_SIZE: usize = 32;
/// The part of a vfd_new the device needs (through `size`).
const VFD_NEW_MIN: usize = 28;
/// vfd_new with its name (NEW_CTX_NAMED) up to the end of the name.
const VFD_NEW_NAMED_MIN: usize = 28 + CTX_NAME_MAX_LEN;
/// ctrl_vfd_send / ctrl_vfd_recv size.
pub const RECV_HEADER_SIZE: usize = 16;
/// send_vfd (v1) entry size.
const SEND_VFD_V1_SIZE: usize = 8;
/// send_vfd kind: a local vfd id.
pub const SEND_VFD_KIND_LOCAL: u32 = 0;

/// The error responses, each the code the guest maps to an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseCode {
    /// RESP_ERR (ENODEV): e.g. no socket by that name, or a host I/O failure.
    #[error("error")]
    Err,
    /// RESP_OUT_OF_MEMORY (ENOMEM): a limit or allocation failure.
    #[error("out of memory")]
    OutOfMemory,
    /// RESP_INVALID_ID (ENOENT): unknown, in-use or reserved id.
    #[error("invalid vfd id")]
    InvalidId,
    /// RESP_INVALID_TYPE (EINVAL): wrong vfd type for the operation.
    #[error("invalid vfd type")]
    InvalidType,
    /// RESP_INVALID_FLAGS (EPERM).
    #[error("invalid flags")]
    InvalidFlags,
    /// RESP_INVALID_CMD (ENOTTY): malformed or unsupported command.
    #[error("invalid command")]
    InvalidCmd,
}

impl ResponseCode {
    /// The wire value.
    pub fn code(self) -> u32 {
        match self {
            Self::Err => RESP_ERR,
            Self::OutOfMemory => RESP_OUT_OF_MEMORY,
            Self::InvalidId => RESP_INVALID_ID,
            Self::InvalidType => RESP_INVALID_TYPE,
            Self::InvalidFlags => RESP_INVALID_FLAGS,
            Self::InvalidCmd => RESP_INVALID_CMD,
        }
    }
}

/// A parsed out-queue command. Borrowed payloads point into the gathered chain bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// VFD_NEW: allocate `size` bytes of shared memory as vfd `id`.
    NewAlloc {
        /// New guest vfd id.
        id: u32,
        /// Flags (0 with TRANS_FLAGS).
        flags: u32,
        /// Requested size in bytes.
        size: u32,
    },
    /// VFD_CLOSE.
    Close {
        /// The vfd.
        id: u32,
    },
    /// VFD_SEND (and SEND_FOREIGN_ID with only local entries).
    Send {
        /// The vfd to send on.
        id: u32,
        /// The vfds to pass (at most 28).
        vfds: Vec<u32>,
        /// The payload.
        data: &'a [u8],
    },
    /// VFD_NEW_CTX: connect to the unnamed socket ("").
    NewCtx {
        /// New guest vfd id.
        id: u32,
    },
    /// VFD_NEW_CTX_NAMED.
    NewCtxNamed {
        /// New guest vfd id.
        id: u32,
        /// The socket name.
        name: String,
    },
    /// VFD_NEW_PIPE.
    NewPipe {
        /// New guest vfd id.
        id: u32,
        /// `VFD_READ` or `VFD_WRITE` (exactly one).
        flags: u32,
    },
}

/// Little-endian u32 at `off`, if in bounds.
pub fn le32(buf: &[u8], off: usize) -> Option<u32> {
    let b = buf.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Little-endian u64 at `off`, if in bounds.
pub fn le64(buf: &[u8], off: usize) -> Option<u64> {
    let lo = le32(buf, off)?;
    let hi = le32(buf, off.checked_add(4)?)?;
    Some(u64::from(lo) | (u64::from(hi) << 32))
}

fn field(buf: &[u8], off: usize) -> Result<u32, ResponseCode> {
    le32(buf, off).ok_or(ResponseCode::InvalidCmd)
}

/// A guest-chosen id for a new vfd must be non-zero and in the guest range.
fn new_id(id: u32) -> Result<u32, ResponseCode> {
    if id == 0 || id & (VFD_HOST_ID_BIT | VFD_ID_INVALID_BIT) != 0 {
        Err(ResponseCode::InvalidId)
    } else {
        Ok(id)
    }
}

/// The type field of a command, if the buffer holds a header.
pub fn command_type(buf: &[u8]) -> Option<u32> {
    if buf.len() < HEADER_SIZE {
        return None;
    }
    le32(buf, 0)
}

/// Parses one command. `trans_flags` says whether VIRTIO_WL_F_TRANS_FLAGS was negotiated.
pub fn parse_command(buf: &[u8], trans_flags: bool) -> Result<Command<'_>, ResponseCode> {
    if buf.len() > MAX_COMMAND_SIZE {
        return Err(ResponseCode::InvalidCmd);
    }
    let ty = command_type(buf).ok_or(ResponseCode::InvalidCmd)?;
    match ty {
        CMD_VFD_NEW => {
            if buf.len() < VFD_NEW_MIN {
                return Err(ResponseCode::InvalidCmd);
            }
            let id = new_id(field(buf, 8)?)?;
            let flags = field(buf, 12)?;
            let size = field(buf, 24)?;
            let allowed = if trans_flags { 0 } else { VFD_WRITE | VFD_MAP };
            if flags & !allowed != 0 {
                return Err(ResponseCode::InvalidFlags);
            }
            if size == 0 {
                return Err(ResponseCode::InvalidCmd);
            }
            Ok(Command::NewAlloc { id, flags, size })
        }
        CMD_VFD_CLOSE => Ok(Command::Close { id: field(buf, 8)? }),
        CMD_VFD_SEND => parse_send(buf, 4, field),
        CMD_VFD_SEND_FOREIGN_ID => parse_send(buf, SEND_VFD_V1_SIZE, |b, off| {
            if field(b, off)? != SEND_VFD_KIND_LOCAL {
                // virtio-gpu resources and fences do not exist on Bulkhead.
                return Err(ResponseCode::InvalidType);
            }
            field(b, off + 4)
        }),
        CMD_VFD_NEW_CTX => {
            if buf.len() < VFD_MSG_SIZE {
                return Err(ResponseCode::InvalidCmd);
            }
            Ok(Command::NewCtx {
                id: new_id(field(buf, 8)?)?,
            })
        }
        CMD_VFD_NEW_CTX_NAMED => {
            if buf.len() < VFD_NEW_NAMED_MIN {
                return Err(ResponseCode::InvalidCmd);
            }
            let id = new_id(field(buf, 8)?)?;
            let raw = buf
                .get(28..VFD_NEW_NAMED_MIN)
                .ok_or(ResponseCode::InvalidCmd)?;
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let name = std::str::from_utf8(raw.get(..end).unwrap_or_default())
                .map_err(|_| ResponseCode::Err)?
                .to_string();
            Ok(Command::NewCtxNamed { id, name })
        }
        CMD_VFD_NEW_PIPE => {
            if buf.len() < VFD_NEW_MIN {
                return Err(ResponseCode::InvalidCmd);
            }
            let id = new_id(field(buf, 8)?)?;
            let flags = field(buf, 12)?;
            if flags != VFD_READ && flags != VFD_WRITE {
                return Err(ResponseCode::InvalidFlags);
            }
            Ok(Command::NewPipe { id, flags })
        }
        // dmabufs need a GPU Bulkhead does not have; ENOTTY tells Sommelier to fall back.
        _ => Err(ResponseCode::InvalidCmd),
    }
}

fn parse_send(
    buf: &[u8],
    entry_size: usize,
    entry: impl Fn(&[u8], usize) -> Result<u32, ResponseCode>,
) -> Result<Command<'_>, ResponseCode> {
    if buf.len() < RECV_HEADER_SIZE {
        return Err(ResponseCode::InvalidCmd);
    }
    let id = field(buf, 8)?;
    let count = field(buf, 12)? as usize;
    if count > MAX_VFDS_PER_MESSAGE {
        return Err(ResponseCode::InvalidCmd);
    }
    let ids_end = RECV_HEADER_SIZE + count * entry_size;
    if buf.len() < ids_end {
        return Err(ResponseCode::InvalidCmd);
    }
    let mut vfds = Vec::with_capacity(count);
    for i in 0..count {
        vfds.push(entry(buf, RECV_HEADER_SIZE + i * entry_size)?);
    }
    let data = buf.get(ids_end..).ok_or(ResponseCode::InvalidCmd)?;
    Ok(Command::Send { id, vfds, data })
}

/// A response written into the writable part of an out-queue chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// RESP_OK.
    Ok,
    /// RESP_VFD_NEW.
    VfdNew(VfdNew),
    /// An error code.
    Error(ResponseCode),
}

/// The body of a VFD_NEW message or RESP_VFD_NEW response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfdNew {
    /// The vfd id.
    pub id: u32,
    /// Its flags.
    pub flags: u32,
    /// Page frame number (absolute or an offset; 0 / 0x100000 when there is no memory).
    pub pfn: u64,
    /// Size in bytes (0 when there is no memory).
    pub size: u32,
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn vfd_new_bytes(ty: u32, v: &VfdNew) -> Vec<u8> {
    let mut out = Vec::with_capacity(VFD_NEW_SIZE);
    put32(&mut out, ty);
    put32(&mut out, 0);
    put32(&mut out, v.id);
    put32(&mut out, v.flags);
    out.extend_from_slice(&v.pfn.to_le_bytes());
    put32(&mut out, v.size);
    put32(&mut out, 0);
    out
}

impl Response {
    /// The bytes the device writes: 32 for RESP_VFD_NEW, the 4-byte code otherwise.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Ok => RESP_OK.to_le_bytes().to_vec(),
            Self::VfdNew(v) => vfd_new_bytes(RESP_VFD_NEW, v),
            Self::Error(c) => c.code().to_le_bytes().to_vec(),
        }
    }
}

impl From<Result<Response, ResponseCode>> for Response {
    fn from(r: Result<Response, ResponseCode>) -> Self {
        r.unwrap_or_else(Response::Error)
    }
}

/// A message the device puts on the in queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InMessage {
    /// VFD_NEW: a host vfd the next RECV will refer to.
    VfdNew(VfdNew),
    /// VFD_RECV: data (at most `MAX_RECV_DATA`) and up to 28 vfd ids arrived on `id`.
    Recv {
        /// The socket or pipe vfd.
        id: u32,
        /// Host vfd ids announced before.
        vfds: Vec<u32>,
        /// The payload.
        data: Vec<u8>,
    },
    /// VFD_HUP: the host end of `id` hung up.
    Hup {
        /// The vfd.
        id: u32,
    },
}

impl InMessage {
    /// The bytes written into one in-queue buffer.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::VfdNew(v) => vfd_new_bytes(CMD_VFD_NEW, v),
            Self::Recv { id, vfds, data } => {
                let mut out = Vec::with_capacity(RECV_HEADER_SIZE + 4 * vfds.len() + data.len());
                put32(&mut out, CMD_VFD_RECV);
                put32(&mut out, 0);
                put32(&mut out, *id);
                put32(&mut out, vfds.len() as u32);
                for v in vfds {
                    put32(&mut out, *v);
                }
                out.extend_from_slice(data);
                out
            }
            Self::Hup { id } => {
                let mut out = Vec::with_capacity(VFD_MSG_SIZE);
                put32(&mut out, CMD_VFD_HUP);
                put32(&mut out, 0);
                put32(&mut out, *id);
                out
            }
        }
    }

    /// The encoded length.
    pub fn len(&self) -> usize {
        match self {
            Self::VfdNew(_) => VFD_NEW_SIZE,
            Self::Recv { vfds, data, .. } => RECV_HEADER_SIZE + 4 * vfds.len() + data.len(),
            Self::Hup { .. } => VFD_MSG_SIZE,
        }
    }

    /// Never true: every message has a header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Parses an in-queue message (what a guest driver does; used by tests and fuzzing to check
/// that encoding round-trips).
pub fn parse_in_message(buf: &[u8]) -> Option<InMessage> {
    match command_type(buf)? {
        CMD_VFD_NEW if buf.len() >= VFD_NEW_MIN => Some(InMessage::VfdNew(VfdNew {
            id: le32(buf, 8)?,
            flags: le32(buf, 12)?,
            pfn: le64(buf, 16)?,
            size: le32(buf, 24)?,
        })),
        CMD_VFD_RECV => {
            let id = le32(buf, 8)?;
            let count = le32(buf, 12)? as usize;
            if count > MAX_VFDS_PER_MESSAGE {
                return None;
            }
            let vfds = (0..count)
                .map(|i| le32(buf, RECV_HEADER_SIZE + 4 * i))
                .collect::<Option<Vec<_>>>()?;
            let data = buf.get(RECV_HEADER_SIZE + 4 * count..)?.to_vec();
            Some(InMessage::Recv { id, vfds, data })
        }
        CMD_VFD_HUP => Some(InMessage::Hup { id: le32(buf, 8)? }),
        _ => None,
    }
}

/// The body of the fuzz target (vmm/fuzz) and of the seed test: parses `data` as a command in
/// both flag modes, encodes the matching response, and checks that in-queue messages built
/// from it round-trip. Must never panic.
pub fn fuzz_exercise(data: &[u8]) {
    for trans in [true, false] {
        let resp = match parse_command(data, trans) {
            Ok(Command::NewAlloc { id, flags, size }) => Response::VfdNew(VfdNew {
                id,
                flags,
                pfn: 0,
                size,
            }),
            Ok(Command::Send { vfds, data, .. }) => {
                let m = InMessage::Recv {
                    id: 1,
                    vfds: vfds.into_iter().take(MAX_VFDS_PER_MESSAGE).collect(),
                    data: data.iter().copied().take(MAX_RECV_DATA).collect(),
                };
                let b = m.encode();
                if b.len() != m.len() || parse_in_message(&b).as_ref() != Some(&m) {
                    // A mismatch is a bug the fuzzer must report.
                    std::process::abort();
                }
                Response::Ok
            }
            Ok(_) => Response::Ok,
            Err(code) => Response::Error(code),
        };
        let enc = resp.encode();
        if enc.len() != 4 && enc.len() != VFD_NEW_SIZE {
            std::process::abort();
        }
    }
    let _ = parse_in_message(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(ty: u32) -> Vec<u8> {
        let mut v = ty.to_le_bytes().to_vec();
        v.extend_from_slice(&0u32.to_le_bytes());
        v
    }

    fn vfd_new(ty: u32, id: u32, flags: u32, size: u32) -> Vec<u8> {
        let mut v = hdr(ty);
        for x in [id, flags, 0, 0, size, 0] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn named(id: u32, name: &[u8]) -> Vec<u8> {
        let mut v = vfd_new(CMD_VFD_NEW_CTX_NAMED, id, 0, 0);
        v.truncate(28);
        let mut n = [0u8; 36];
        n[..name.len()].copy_from_slice(name);
        v.extend_from_slice(&n);
        v
    }

    fn send(ty: u32, id: u32, count: u32, entries: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = hdr(ty);
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(&count.to_le_bytes());
        for e in entries {
            v.extend_from_slice(&e.to_le_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn alloc_parses_with_and_without_trans_flags() {
        let b = vfd_new(CMD_VFD_NEW, 5, 0, 8192);
        assert_eq!(
            parse_command(&b, true),
            Ok(Command::NewAlloc {
                id: 5,
                flags: 0,
                size: 8192
            })
        );
        let b = vfd_new(CMD_VFD_NEW, 5, VFD_WRITE | VFD_MAP, 4096);
        assert_eq!(parse_command(&b, true), Err(ResponseCode::InvalidFlags));
        assert!(matches!(
            parse_command(&b, false),
            Ok(Command::NewAlloc { flags: 3, .. })
        ));
        let b = vfd_new(CMD_VFD_NEW, 5, VFD_CONTROL, 4096);
        assert_eq!(parse_command(&b, false), Err(ResponseCode::InvalidFlags));
        let b = vfd_new(CMD_VFD_NEW, 5, 0, 0);
        assert_eq!(parse_command(&b, true), Err(ResponseCode::InvalidCmd));
    }

    #[test]
    fn new_ids_must_be_guest_ids() {
        for id in [
            0,
            VFD_HOST_ID_BIT,
            VFD_HOST_ID_BIT | 7,
            VFD_ID_INVALID_BIT | 1,
        ] {
            for ty in [CMD_VFD_NEW, CMD_VFD_NEW_PIPE, CMD_VFD_NEW_CTX] {
                let b = vfd_new(ty, id, VFD_READ, 4096);
                assert_eq!(
                    parse_command(&b, true),
                    Err(ResponseCode::InvalidId),
                    "{ty:#x} {id:#x}"
                );
            }
            assert_eq!(
                parse_command(&named(id, b"x"), true),
                Err(ResponseCode::InvalidId)
            );
        }
    }

    #[test]
    fn short_chains_are_invalid_commands() {
        let full = [
            vfd_new(CMD_VFD_NEW, 1, 0, 4096),
            vfd_new(CMD_VFD_NEW_PIPE, 1, VFD_READ, 0),
            vfd_new(CMD_VFD_NEW_CTX, 1, 0, 0),
            named(1, b"wayland"),
            send(CMD_VFD_SEND, 1, 0, &[], b""),
            send(CMD_VFD_CLOSE, 1, 0, &[], b"")[..12].to_vec(),
        ];
        for b in &full {
            let minimum = match command_type(b).unwrap() {
                CMD_VFD_NEW | CMD_VFD_NEW_PIPE => 28,
                CMD_VFD_NEW_CTX | CMD_VFD_CLOSE => 12,
                CMD_VFD_NEW_CTX_NAMED => 60,
                _ => 16,
            };
            assert!(parse_command(b, true).is_ok());
            for len in 0..minimum {
                assert_eq!(
                    parse_command(&b[..len], true),
                    Err(ResponseCode::InvalidCmd),
                    "{:#x} cut at {len}",
                    command_type(b).unwrap()
                );
            }
        }
    }

    #[test]
    fn close_and_ctx() {
        assert_eq!(
            parse_command(&send(CMD_VFD_CLOSE, 9, 0, &[], b"")[..12], true),
            Ok(Command::Close { id: 9 })
        );
        // The guest sends a whole vfd_new for NEW_CTX; only hdr+id matter.
        assert_eq!(
            parse_command(&vfd_new(CMD_VFD_NEW_CTX, 3, VFD_READ | VFD_WRITE, 0), true),
            Ok(Command::NewCtx { id: 3 })
        );
    }

    #[test]
    fn named_ctx_names() {
        assert_eq!(
            parse_command(&named(2, b"wl-conn-0"), true),
            Ok(Command::NewCtxNamed {
                id: 2,
                name: "wl-conn-0".into()
            })
        );
        // 32 bytes without NUL is a full-length name.
        let long = [b'a'; 32];
        assert!(matches!(
            parse_command(&named(2, &long), true),
            Ok(Command::NewCtxNamed { name, .. }) if name.len() == 32
        ));
        assert_eq!(
            parse_command(&named(2, &[0xff, 0xfe]), true),
            Err(ResponseCode::Err)
        );
    }

    #[test]
    fn pipe_flags_need_exactly_one_direction() {
        for (flags, ok) in [
            (VFD_READ, true),
            (VFD_WRITE, true),
            (0, false),
            (VFD_READ | VFD_WRITE, false),
            (VFD_FENCE, false),
        ] {
            let b = vfd_new(CMD_VFD_NEW_PIPE, 4, flags, 0);
            let r = parse_command(&b, true);
            if ok {
                assert_eq!(r, Ok(Command::NewPipe { id: 4, flags }));
            } else {
                assert_eq!(r, Err(ResponseCode::InvalidFlags));
            }
        }
    }

    #[test]
    fn send_with_vfds_and_data() {
        let b = send(CMD_VFD_SEND, 1, 2, &[7, 0x4000_0001], b"hello");
        assert_eq!(
            parse_command(&b, true),
            Ok(Command::Send {
                id: 1,
                vfds: vec![7, 0x4000_0001],
                data: b"hello"
            })
        );
        let ids: Vec<u32> = (1..=28).collect();
        assert!(matches!(
            parse_command(&send(CMD_VFD_SEND, 1, 28, &ids, b"x"), true),
            Ok(Command::Send { vfds, .. }) if vfds.len() == 28
        ));
        let ids: Vec<u32> = (1..=29).collect();
        assert_eq!(
            parse_command(&send(CMD_VFD_SEND, 1, 29, &ids, b"x"), true),
            Err(ResponseCode::InvalidCmd)
        );
        // A count larger than the ids present.
        assert_eq!(
            parse_command(&send(CMD_VFD_SEND, 1, 3, &[1, 2], b""), true),
            Err(ResponseCode::InvalidCmd)
        );
        assert_eq!(
            parse_command(&send(CMD_VFD_SEND, 1, u32::MAX, &[], b""), true),
            Err(ResponseCode::InvalidCmd)
        );
    }

    #[test]
    fn send_foreign_id_takes_local_entries_only() {
        let b = send(
            CMD_VFD_SEND_FOREIGN_ID,
            1,
            1,
            &[SEND_VFD_KIND_LOCAL, 6],
            b"d",
        );
        assert_eq!(
            parse_command(&b, true),
            Ok(Command::Send {
                id: 1,
                vfds: vec![6],
                data: b"d"
            })
        );
        let b = send(CMD_VFD_SEND_FOREIGN_ID, 1, 1, &[1, 6], b"d");
        assert_eq!(parse_command(&b, true), Err(ResponseCode::InvalidType));
    }

    #[test]
    fn oversized_and_unknown_commands() {
        let mut b = send(CMD_VFD_SEND, 1, 0, &[], b"");
        b.resize(MAX_COMMAND_SIZE + 1, 0);
        assert_eq!(parse_command(&b, true), Err(ResponseCode::InvalidCmd));
        for ty in [
            0,
            CMD_VFD_RECV,
            CMD_VFD_HUP,
            CMD_VFD_NEW_DMABUF,
            CMD_VFD_DMABUF_SYNC,
            RESP_OK,
            0xffff_ffff,
        ] {
            let b = vfd_new(ty, 1, 0, 4096);
            assert_eq!(parse_command(&b, true), Err(ResponseCode::InvalidCmd));
        }
    }

    #[test]
    fn response_codes_and_encoding() {
        let codes = [
            (ResponseCode::Err, 0x1100),
            (ResponseCode::OutOfMemory, 0x1101),
            (ResponseCode::InvalidId, 0x1102),
            (ResponseCode::InvalidType, 0x1103),
            (ResponseCode::InvalidFlags, 0x1104),
            (ResponseCode::InvalidCmd, 0x1105),
        ];
        for (c, v) in codes {
            assert_eq!(Response::Error(c).encode(), u32::to_le_bytes(v).to_vec());
        }
        assert_eq!(Response::Ok.encode(), 0x1000u32.to_le_bytes().to_vec());
        let r = Response::VfdNew(VfdNew {
            id: 3,
            flags: 0,
            pfn: 0x1_2345_6789,
            size: 8192,
        })
        .encode();
        assert_eq!(r.len(), 32);
        assert_eq!(le32(&r, 0), Some(RESP_VFD_NEW));
        assert_eq!(le32(&r, 8), Some(3));
        assert_eq!(le64(&r, 16), Some(0x1_2345_6789));
        assert_eq!(le32(&r, 24), Some(8192));
    }

    #[test]
    fn in_messages_round_trip() {
        let msgs = [
            InMessage::VfdNew(VfdNew {
                id: VFD_HOST_ID_BIT | 1,
                flags: VFD_READ | VFD_WRITE,
                pfn: 0,
                size: 0,
            }),
            InMessage::Recv {
                id: 1,
                vfds: vec![VFD_HOST_ID_BIT | 1],
                data: vec![1, 2, 3],
            },
            InMessage::Recv {
                id: 1,
                vfds: vec![],
                data: vec![0; MAX_RECV_DATA],
            },
            InMessage::Hup { id: 5 },
        ];
        for m in msgs {
            let b = m.encode();
            assert_eq!(b.len(), m.len());
            assert!(b.len() <= IN_BUFFER_SIZE);
            assert_eq!(parse_in_message(&b), Some(m));
        }
        assert_eq!(MAX_RECV_DATA, 3968);
    }
}
