//! Reads the running kernel's BTF to find where fields of kernel structs live.
//!
//! Rust eBPF has no CO-RE relocations, so the kernel programs that read `struct sock` and
//! `struct sk_psock` get the offsets from userspace at load time. The file comes from the
//! kernel, but a parser of a file trusts none of it: every read is bounds-checked, no length
//! in the input sizes an allocation, and the work is linear in the input's size.

use std::{
    collections::HashSet,
    io,
    path::{Path, PathBuf},
};

use BtfError::Malformed;

/// Where the short-circuit's queue-length read finds its fields on the running kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// Byte offset of `struct sock::sk_user_data` (the sockmap's `struct sk_psock *`).
    pub sock_user_data: u32,
    /// Byte offset of `struct sk_psock::msg_tot_len` (bytes queued on the psock's ingress).
    pub psock_msg_tot_len: u32,
    /// Byte offset of `struct tcp_sock::write_seq` (end of the data queued to TCP).
    pub tcp_write_seq: u32,
    /// Byte offset of `struct tcp_sock::copied_seq` (end of the data the reader consumed).
    pub tcp_copied_seq: u32,
    /// Byte offset of `struct sock::__sk_common.skc_prot` (the socket's `struct proto *`).
    pub sock_prot: u32,
    /// Byte offsets of `struct proto::memory_allocated` (`atomic_long_t *`, pages) and
    /// `struct proto::sysctl_mem` (`long *`, the tcp_mem thresholds in pages).
    pub proto_memory_allocated: u32,
    pub proto_sysctl_mem: u32,
    /// `sizeof(struct sk_msg)`: what `bpf_tcp_ingress` allocates for every redirected message.
    pub sk_msg_size: u32,
    /// Byte offsets of `struct sock::sk_socket`, `struct socket::file` and
    /// `struct file::f_flags`: whether a workload's socket is blocking.
    pub sock_socket: u32,
    pub socket_file: u32,
    pub file_flags: u32,
    /// Byte offsets of `struct socket::sk`, `struct sock::sk_protocol`, and of
    /// `skc_state`, `skc_num`, `skc_net` in `struct sock` (its `__sk_common`) and
    /// `struct net::net_cookie`: the start-up listener scan's key of a listener.
    pub socket_sk: u32,
    pub sock_protocol: u32,
    pub skc_state: u32,
    pub skc_num: u32,
    pub skc_net: u32,
    pub net_cookie: u32,
    /// Byte offsets in `struct sock` (its `__sk_common`) of the family, remote port and the
    /// IPv4 and IPv6 local and remote addresses: the release sweep's key of a proxy socket.
    pub skc_family: u32,
    pub skc_dport: u32,
    pub skc_rcv_saddr: u32,
    pub skc_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
}

impl KernelOffsets {
    /// Kernel memory one redirected message holds besides its bytes: its `struct sk_msg`, as
    /// the kmalloc size class that serves it (powers of two, and 96 and 192).
    pub fn msg_cost(&self) -> u32 {
        match self.sk_msg_size {
            0 => 0,
            65..=96 => 96,
            129..=192 => 192,
            n => n.checked_next_power_of_two().unwrap_or(u32::MAX).max(8),
        }
    }
}

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "{} does not exist: the kernel was built without CONFIG_DEBUG_INFO_BTF=y, so the proxy \
         cannot learn its struct layouts; use a kernel built with it",
        .path.display()
    )]
    NoBtf { path: PathBuf },
    #[error("reading {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("not BTF: magic {0:#06x}, expected 0xeb9f; pass the kernel's BTF ({VMLINUX})")]
    BadMagic(u16),
    #[error("BTF version {0} is not supported (expected 1); update proxy/src/ebpf/btf.rs")]
    BadVersion(u8),
    #[error("malformed BTF: {0}; pass the running kernel's own BTF ({VMLINUX})")]
    Malformed(&'static str),
    #[error(
        "BTF type {id} has kind {kind}, unknown to this reader (a newer kernel?), so the types \
         after it cannot be found; teach proxy/src/ebpf/btf.rs the kind's size"
    )]
    UnknownKind { id: u32, kind: u32 },
    #[error("the BTF has no `struct {0}`")]
    NoStruct(String),
    #[error("the BTF has no member `{0}`")]
    NoMember(String),
    #[error("`{0}` is a bitfield or not byte-aligned; the kernel programs read whole bytes")]
    Bitfield(String),
    #[error(
        "the kernel's `struct sk_psock` has no `msg_tot_len` (the count of bytes waiting in a \
         socket's short-circuit queue, which the adaptive policy reads to bound memory); this \
         kernel is older than the proxy supports for the short-circuit: turn it off with \
         `--sockmap off` or `intercept.sockmap = false`"
    )]
    NoMsgTotLen,
}

/// Byte offset of `member` in `struct strukt`, also found inside anonymous struct/union
/// members (their offsets added). Bitfield members are an error.
pub fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Result<u32, BtfError> {
    Btf::parse(btf)?.offset(strukt, member)
}

/// Reads `path` (normally [`VMLINUX`]) and returns every offset the short-circuit needs. A missing file is
/// [`BtfError::NoBtf`]; a kernel without `sk_psock::msg_tot_len` is [`BtfError::NoMsgTotLen`]:
/// both say what to do.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, BtfError> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => BtfError::NoBtf { path: path.into() },
        _ => BtfError::Read {
            path: path.into(),
            source,
        },
    })?;
    let btf = Btf::parse(&bytes)?;
    let psock_msg_tot_len = match btf.offset("sk_psock", "msg_tot_len") {
        Err(BtfError::NoStruct(_) | BtfError::NoMember(_)) => Err(BtfError::NoMsgTotLen),
        other => other,
    }?;
    let sock_user_data = btf.offset("sock", "sk_user_data")?;
    Ok(KernelOffsets {
        sock_user_data,
        psock_msg_tot_len,
        tcp_write_seq: btf.offset("tcp_sock", "write_seq")?,
        tcp_copied_seq: btf.offset("tcp_sock", "copied_seq")?,
        sock_prot: common(&btf, "skc_prot")?,
        proto_memory_allocated: btf.offset("proto", "memory_allocated")?,
        proto_sysctl_mem: btf.offset("proto", "sysctl_mem")?,
        sk_msg_size: btf.struct_size("sk_msg")?,
        sock_socket: btf.offset("sock", "sk_socket")?,
        socket_file: btf.offset("socket", "file")?,
        file_flags: btf.offset("file", "f_flags")?,
        socket_sk: btf.offset("socket", "sk")?,
        sock_protocol: btf.offset("sock", "sk_protocol")?,
        skc_state: common(&btf, "skc_state")?,
        skc_num: common(&btf, "skc_num")?,
        // possible_net_t's only member, `net`, is at its start.
        skc_net: common(&btf, "skc_net")?,
        net_cookie: btf.offset("net", "net_cookie")?,
        skc_family: common(&btf, "skc_family")?,
        skc_dport: common(&btf, "skc_dport")?,
        skc_rcv_saddr: common(&btf, "skc_rcv_saddr")?,
        skc_daddr: common(&btf, "skc_daddr")?,
        skc_v6_rcv_saddr: common(&btf, "skc_v6_rcv_saddr")?,
        skc_v6_daddr: common(&btf, "skc_v6_daddr")?,
    })
}

/// Byte offset in `struct sock` of `member` of its `struct sock_common`.
fn common(btf: &Btf<'_>, member: &str) -> Result<u32, BtfError> {
    btf.offset("sock", "__sk_common")?
        .checked_add(btf.offset("sock_common", member)?)
        .ok_or(Malformed("sock_common offset overflows"))
}

// === impl Btf ===

const MAGIC: u16 = 0xeb9f;
const VERSION: u8 = 1;
/// The header this reader knows; a longer one (future fields) is skipped via `hdr_len`.
const HDR_LEN: usize = 24;
/// Every type starts with three words (name_off, info, size_or_type); every member is three.
const RECORD: usize = 12;
/// Typedef and qualifier chains are a few links long; a longer one loops in crafted input.
const MAX_CHAIN: usize = 32;
/// Kernel structs nest anonymous unions and structs a few levels deep; the bound keeps the
/// recursion's stack small whatever the input says.
const MAX_ANON_DEPTH: u32 = 4;

/// Kinds, from include/uapi/linux/btf.h.
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}
use kind::*;

/// Bytes after a type's record; None for a kind whose layout this reader does not know.
fn trailing(kind: u32, vlen: usize) -> Option<usize> {
    // vlen is at most 0xffff: these products cannot overflow.
    Some(match kind {
        INT | VAR | DECL_TAG => 4,
        PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
        ARRAY => 12,
        STRUCT | UNION | DATASEC | ENUM64 => vlen * 12,
        ENUM | FUNC_PROTO => vlen * 8,
        _ => return None,
    })
}

/// BTF is in the byte order of the kernel that wrote it, which is this host's.
fn word(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

struct Btf<'a> {
    types: &'a [u8],
    strs: &'a [u8],
    /// Where each type starts in `types`: type id `n` is at index `n - 1`. An entry per 12
    /// or more bytes of input, so the input's size bounds it.
    starts: Vec<usize>,
}

/// A type's record, decoded; `at` (its start in the type section) identifies it.
struct Type {
    at: usize,
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
}

impl<'a> Btf<'a> {
    fn parse(btf: &'a [u8]) -> Result<Self, BtfError> {
        let short = || Malformed("shorter than its header");
        let magic = btf
            .get(..2)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(short)?;
        match (u16::from_ne_bytes(magic), btf.get(2)) {
            (MAGIC, Some(&VERSION)) => {}
            (MAGIC, Some(&v)) => return Err(BtfError::BadVersion(v)),
            (MAGIC, None) => return Err(short()),
            (other, _) => return Err(BtfError::BadMagic(other)),
        }
        let hdr_len = word(btf, 4).ok_or_else(short)? as usize;
        if hdr_len < HDR_LEN || hdr_len > btf.len() {
            return Err(Malformed("header length out of range"));
        }
        let section = |at: usize| {
            let start = hdr_len.checked_add(word(btf, at)? as usize)?;
            btf.get(start..start.checked_add(word(btf, at + 4)? as usize)?)
        };
        let types = section(8).ok_or(Malformed("type section past the end"))?;
        let strs = section(16).ok_or(Malformed("string section past the end"))?;

        let mut btf = Btf {
            types,
            strs,
            starts: Vec::new(),
        };
        let mut at = 0;
        while at < types.len() {
            let ty = btf.type_at(at)?;
            let id = u32::try_from(btf.starts.len() + 1).unwrap_or(u32::MAX);
            let extra =
                trailing(ty.kind, ty.vlen).ok_or(BtfError::UnknownKind { id, kind: ty.kind })?;
            btf.starts.push(at);
            at = at
                .checked_add(RECORD + extra)
                .filter(|&end| end <= types.len())
                .ok_or(Malformed("a type runs past the type section"))?;
        }
        Ok(btf)
    }

    /// The three words at `at`: a type's record or a struct member.
    fn record(&self, at: usize) -> Result<[u32; 3], BtfError> {
        let w = |i: usize| word(self.types, at.checked_add(i * 4)?);
        match (w(0), w(1), w(2)) {
            (Some(a), Some(b), Some(c)) => Ok([a, b, c]),
            _ => Err(Malformed("a record runs past the type section")),
        }
    }

    fn type_at(&self, at: usize) -> Result<Type, BtfError> {
        let [name_off, info, size_or_type] = self.record(at)?;
        let (kind, vlen, kind_flag) = (
            (info >> 24) & 0x1f,
            (info & 0xffff) as usize,
            info >> 31 == 1,
        );
        Ok(Type {
            at,
            name_off,
            kind,
            vlen,
            kind_flag,
            size_or_type,
        })
    }

    fn name(&self, off: u32) -> Result<&'a [u8], BtfError> {
        let tail = self.strs.get(off as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0);
        let end = end.ok_or(Malformed(
            "a name past the string section or without its NUL",
        ))?;
        Ok(tail.get(..end).unwrap_or_default())
    }

    fn find_struct(&self, strukt: &str) -> Result<Type, BtfError> {
        for &at in &self.starts {
            let ty = self.type_at(at)?;
            if ty.kind == STRUCT && self.name(ty.name_off)? == strukt.as_bytes() {
                return Ok(ty);
            }
        }
        Err(BtfError::NoStruct(strukt.into()))
    }

    /// `sizeof(struct strukt)` (a STRUCT record's third word is its size in bytes).
    fn struct_size(&self, strukt: &str) -> Result<u32, BtfError> {
        Ok(self.find_struct(strukt)?.size_or_type)
    }

    fn offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let ty = self.find_struct(strukt)?;
        let path = || format!("struct {strukt}::{member}");
        let mut seen = HashSet::from([ty.at]);
        let (bits, bitfield) = self
            .find_bits(&ty, member, MAX_ANON_DEPTH, &mut seen)?
            .ok_or_else(|| BtfError::NoMember(path()))?;
        // Without kind_flag a bitfield shows only in its INT type's encoding; pahole sets
        // kind_flag on every struct with bitfields, and a misaligned member is caught anyway.
        if bitfield != 0 || bits % 8 != 0 {
            return Err(BtfError::Bitfield(path()));
        }
        Ok(bits / 8)
    }

    /// (bit offset, bitfield size) of `member` in `ty` or in its anonymous members. `seen`
    /// searches each type once: a crafted struct with thousands of anonymous members of its
    /// own type would otherwise cost vlen^depth reads.
    fn find_bits(
        &self,
        ty: &Type,
        member: &str,
        depth: u32,
        seen: &mut HashSet<usize>,
    ) -> Result<Option<(u32, u32)>, BtfError> {
        for i in 0..ty.vlen {
            // i < 0x10000; a saturated sum is past the section, which `record` reports.
            let [name_off, type_id, raw] =
                self.record(ty.at.saturating_add(RECORD + i * RECORD))?;
            // With kind_flag, the top 8 bits of the offset are the bitfield's size.
            let (bits, bitfield) = if ty.kind_flag {
                (raw & 0xff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            let name = self.name(name_off)?;
            if name == member.as_bytes() {
                return Ok(Some((bits, bitfield)));
            }
            if !name.is_empty() || depth == 0 {
                continue;
            }
            let Some(inner) = self.composite(type_id)? else {
                continue;
            };
            if !seen.insert(inner.at) {
                continue;
            }
            let found = self.find_bits(&inner, member, depth - 1, seen)?;
            if let Some((inner_bits, bitfield)) = found {
                let bits = bits
                    .checked_add(inner_bits)
                    .ok_or(Malformed("offset overflows"))?;
                return Ok(Some((bits, bitfield)));
            }
        }
        Ok(None)
    }

    /// The struct or union behind typedefs and qualifiers, if that is what `id` names.
    fn composite(&self, mut id: u32) -> Result<Option<Type>, BtfError> {
        for _ in 0..MAX_CHAIN {
            // Id 0 is `void`.
            let Some(index) = (id as usize).checked_sub(1) else {
                return Ok(None);
            };
            let at = self
                .starts
                .get(index)
                .ok_or(Malformed("a type id past the last type"))?;
            let ty = self.type_at(*at)?;
            match ty.kind {
                STRUCT | UNION => return Ok(Some(ty)),
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = ty.size_or_type,
                _ => return Ok(None),
            }
        }
        Err(Malformed("a typedef or qualifier chain that does not end"))
    }
}

#[cfg(test)]
mod tests {
    use super::{BtfError::*, *};

    /// Builds BTF blobs: types in section order (ids from 1) and their names.
    struct Builder {
        types: Vec<u8>,
        strs: Vec<u8>,
        ids: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strs: vec![0],
                ids: 0,
            }
        }

        fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strs.len() as u32;
            self.strs.extend(s.bytes().chain([0]));
            off
        }

        /// `info` is `kind << 24 | vlen`, plus `1 << 31` for kind_flag. Returns the type's id.
        fn ty(&mut self, name: &str, info: u32, size: u32, tail: &[u32]) -> u32 {
            let name = self.name(name);
            for w in [name, info, size].iter().chain(tail) {
                self.types.extend(w.to_ne_bytes());
            }
            self.ids += 1;
            self.ids
        }

        /// `members`: (name, type id, offset word as BTF stores it).
        fn composite(&mut self, info: u32, name: &str, members: &[(&str, u32, u32)]) -> u32 {
            let tail: Vec<u32> = members
                .iter()
                .flat_map(|&(m, t, o)| [self.name(m), t, o])
                .collect();
            self.ty(name, info | members.len() as u32, 64, &tail)
        }

        fn build(&self) -> Vec<u8> {
            let (types, strs) = (self.types.len() as u32, self.strs.len() as u32);
            let mut out = [MAGIC.to_ne_bytes(), [VERSION, 0]].concat();
            out.extend(
                [HDR_LEN as u32, 0, types, types, strs]
                    .iter()
                    .flat_map(|w| w.to_ne_bytes()),
            );
            [out, self.types.clone(), self.strs.clone()].concat()
        }
    }

    /// Every known kind before the structs; anonymous members (msg_tot_len behind a const
    /// typedef of an anonymous struct); a kind_flag struct with a bitfield.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let k = |kind: u32| kind << 24;
        let int = b.ty("unsigned int", k(INT), 4, &[32]);
        let ptr = b.ty("", k(PTR), 0, &[]);
        b.ty("", k(ARRAY), 0, &[int, int, 4]);
        let e1 = b.name("E1");
        b.ty("e", k(ENUM) | 1, 4, &[e1, 0]);
        b.ty("fwd", k(FWD), 0, &[]);
        b.ty("", k(VOLATILE), int, &[]);
        b.ty("", k(RESTRICT), ptr, &[]);
        let proto = b.ty("", k(FUNC_PROTO) | 1, int, &[0, int]);
        b.ty("f", k(FUNC), proto, &[]);
        let var = b.ty("v", k(VAR), int, &[1]);
        b.ty(".data", k(DATASEC) | 1, 4, &[var, 0, 4]);
        b.ty("double", k(FLOAT), 8, &[]);
        b.ty("tag", k(DECL_TAG), var, &[u32::MAX]);
        b.ty("tag", k(TYPE_TAG), ptr, &[]);
        b.ty("e64", k(ENUM64) | 1, 8, &[e1, 1, 0]);
        let union = b.composite(k(UNION), "", &[("skc_a", int, 0), ("skc_b", ptr, 0)]);
        b.composite(
            k(STRUCT),
            "sock",
            &[
                ("sk_refcnt", int, 0),
                ("", union, 64),
                ("sk_user_data", ptr, 656 * 8),
            ],
        );
        let inner = b.composite(
            k(STRUCT),
            "",
            &[("pad", int, 0), ("msg_tot_len", int, 28 * 8)],
        );
        let typedef = b.ty("inner_t", k(TYPEDEF), inner, &[]);
        let konst = b.ty("", k(CONST), typedef, &[]);
        let bitfield = 3 << 24 | (1000 * 8 + 1);
        let psock = [
            ("sk", ptr, 0),
            ("", konst, 384 * 8),
            ("state", int, bitfield),
        ];
        b.composite(k(STRUCT) | 1 << 31, "sk_psock", &psock);
        b.build()
    }

    #[test]
    fn finds_members() {
        let btf = sample();
        let found = |s, m| member_offset(&btf, s, m).ok();
        assert_eq!(found("sock", "sk_user_data"), Some(656));
        assert_eq!(found("sock", "sk_refcnt"), Some(0));
        assert_eq!(found("sock", "skc_b"), Some(8));
        // Through const, typedef and the anonymous struct: 384 + 28.
        assert_eq!(found("sk_psock", "msg_tot_len"), Some(412));
    }

    #[test]
    fn missing_and_bitfield() {
        let btf = sample();
        let err = |s, m| member_offset(&btf, s, m).err();
        assert!(matches!(err("sock", "nope"), Some(NoMember(_))));
        assert!(matches!(err("nope", "sk_user_data"), Some(NoStruct(_))));
        assert!(
            matches!(err("inner_t", "msg_tot_len"), Some(NoStruct(_))),
            "not a struct"
        );
        assert!(matches!(err("sk_psock", "state"), Some(Bitfield(_))));
        let mut b = Builder::new();
        let int = b.ty("int", INT << 24, 4, &[32]);
        b.composite(STRUCT << 24, "s", &[("odd", int, 12)]);
        assert!(matches!(
            member_offset(&b.build(), "s", "odd"),
            Err(Bitfield(_))
        ));
    }

    #[test]
    fn truncations_never_panic_nor_change_the_answer() {
        let btf = sample();
        for (s, m) in [("sock", "sk_user_data"), ("sk_psock", "msg_tot_len")] {
            let whole = member_offset(&btf, s, m).ok();
            for n in 0..btf.len() {
                if let Ok(off) = member_offset(&btf[..n], s, m) {
                    assert_eq!(Some(off), whole, "{n}-byte prefix");
                }
            }
        }
    }

    #[test]
    fn rejects_bad_headers_sections_names_and_kinds() {
        let btf = sample();
        let with = |at: usize, bytes: &[u8]| {
            let mut b = btf.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            member_offset(&b, "sock", "sk_user_data").err()
        };
        assert!(matches!(with(0, &[0xeb, 0x9f]), Some(BadMagic(0x9feb))));
        assert!(matches!(with(2, &[2]), Some(BadVersion(2))));
        assert!(
            matches!(with(4, &8u32.to_ne_bytes()), Some(Malformed(_))),
            "hdr_len < 24"
        );
        // hdr_len, then each section's offset and length, past the end.
        for field in [4, 8, 12, 16, 20] {
            for value in [btf.len() as u32, u32::MAX] {
                let err = with(field, &value.to_ne_bytes());
                assert!(
                    matches!(err, Some(Malformed(_))),
                    "{field}={value}: {err:?}"
                );
            }
        }

        let mut b = Builder::new();
        b.ty("", STRUCT << 24, 0, &[]);
        let mut bad_name = b.build();
        bad_name[HDR_LEN..HDR_LEN + 4].copy_from_slice(&1000u32.to_ne_bytes());
        let err = member_offset(&bad_name, "sock", "x");
        assert!(matches!(err, Err(Malformed(_))), "{err:?}");

        b.ty("", 20 << 24, 0, &[]);
        let err = member_offset(&b.build(), "sock", "x");
        assert!(
            matches!(err, Err(UnknownKind { id: 2, kind: 20 })),
            "{err:?}"
        );
    }

    #[test]
    fn random_buffers_never_panic() {
        let sample = sample();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as usize
        };
        for round in 0..10_000 {
            // Mostly mutated samples, as random bytes rarely get past the magic.
            let mut buf = sample.clone();
            if round % 4 == 0 {
                buf.truncate(2);
                buf.extend((0..next() % 256).map(|_| next() as u8));
            }
            for _ in 0..1 + next() % 8 {
                let at = next() % buf.len();
                buf[at] = next() as u8;
            }
            buf.truncate(next() % (buf.len() + 1));
            let _ = member_offset(&buf, "sk_psock", "msg_tot_len");
        }
    }

    #[test]
    fn running_kernel() {
        let path = Path::new(VMLINUX);
        if !path.exists() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "{VMLINUX} is missing under CI"
            );
            eprintln!("note: {VMLINUX} is missing; not checking the running kernel's offsets");
            return;
        }
        let offsets = kernel_offsets(path).map_err(|e| e.to_string());
        let k = offsets.unwrap_or_else(|e| panic!("{e}"));
        for off in [k.sock_user_data, k.psock_msg_tot_len] {
            assert!(off > 0 && off < 1024, "{k:?}");
        }
        // tcp_sock embeds struct sock, so its fields lie beyond it; write_seq follows
        // copied_seq in every layout so far (only checked loosely: both inside tcp_sock).
        for off in [k.tcp_write_seq, k.tcp_copied_seq] {
            assert!(off > k.sock_user_data && off < 4096, "{k:?}");
        }
        for off in [k.sock_socket, k.socket_file, k.file_flags] {
            assert!(off > 0 && off < 1024, "{k:?}");
        }
        // struct sock_common opens struct sock: its state, port and namespace come first
        // (skc_state at 18 and skc_num at 14 on every x86-64 layout so far), then the rest
        // of struct sock; sk comes after socket's state, type and flags.
        for off in [k.skc_state, k.skc_num, k.skc_net] {
            assert!(off > 0 && off < 136, "{k:?}");
        }
        assert!(
            k.sock_protocol > k.skc_net && k.sock_protocol < 1024,
            "{k:?}"
        );
        assert!(k.socket_sk > 0 && k.socket_sk < 128, "{k:?}");
        assert!(k.net_cookie > 0 && k.net_cookie < 16384, "{k:?}");
        // The addresses and ports open struct sock_common (skc_daddr 0, skc_rcv_saddr 4,
        // skc_dport 12, skc_family 16 on x86-64); the IPv6 addresses come later in it.
        assert_eq!((k.skc_daddr, k.skc_rcv_saddr), (0, 4), "{k:?}");
        assert!(k.skc_dport < k.skc_num && k.skc_family > k.skc_num, "{k:?}");
        assert!(
            k.skc_v6_daddr > k.skc_family && k.skc_v6_rcv_saddr > k.skc_v6_daddr,
            "{k:?}"
        );
        assert!(k.skc_v6_rcv_saddr < 136, "{k:?}");
        // A struct sk_msg holds MAX_MSG_FRAGS + 2 scatterlist entries: hundreds of bytes.
        assert!((256..4096).contains(&k.sk_msg_size), "{k:?}");
        assert!(k.msg_cost() >= k.sk_msg_size, "{k:?}");
    }

    #[test]
    fn msg_cost_is_the_kmalloc_class() {
        let cost = |sk_msg_size| {
            KernelOffsets {
                sk_msg_size,
                ..KernelOffsets::default()
            }
            .msg_cost()
        };
        assert_eq!(cost(0), 0);
        assert_eq!(cost(5), 8);
        assert_eq!(cost(80), 96);
        assert_eq!(cost(100), 128);
        assert_eq!(cost(150), 192);
        assert_eq!(cost(712), 1024);
        assert_eq!(cost(1024), 1024);
        assert_eq!(cost(u32::MAX), u32::MAX);
    }

    #[test]
    fn missing_file_names_the_kernel_option() {
        let err = kernel_offsets(Path::new("/nonexistent/vmlinux")).map_err(|e| e.to_string());
        assert!(err.is_err_and(|e| e.contains("CONFIG_DEBUG_INFO_BTF")));
    }
}
