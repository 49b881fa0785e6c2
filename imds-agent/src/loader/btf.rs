//! Field offsets of the running kernel's socket structures, read from its BTF
//! (/sys/kernel/btf/vmlinux), so the connect programs can find a socket's creator (its cgroup
//! and credentials) by following pointers with bpf_probe_read_kernel. The offsets differ per
//! kernel build; BTF is the kernel's own description of them.
//!
//! Only the few BTF kinds needed to walk struct members are interpreted; every other kind is
//! skipped by its documented size (Documentation/bpf/btf.rst).

use std::collections::HashMap;

use imds_common::{SocketOffsets, TaskOffsets};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

struct Member {
    name: u32,
    type_id: u32,
    /// Bits from the start of the struct.
    bit_offset: u32,
}

enum Type {
    Composite { name: u32, members: Vec<Member> },
    Other,
}

/// The struct and union types of one BTF blob, enough to resolve member paths.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id - 1.
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let header_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(header_len + off..header_len + off + len)
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();

        let mut types = Vec::new();
        let mut at = 0;
        while at < type_data.len() {
            let name = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_data, m + 8)?;
                        members.push(Member {
                            name: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            // With kind_flag the high 8 bits hold a bitfield's size.
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    at += vlen * 12;
                    Type::Composite { name, members }
                }
                _ => {
                    at += match kind {
                        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                        KIND_ARRAY => 12,
                        KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                        KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                        _ => 0,
                    };
                    Type::Other
                }
            };
            types.push(ty);
        }
        let mut btf = Self {
            strings,
            types,
            structs_by_name: HashMap::new(),
        };
        for (index, ty) in btf.types.iter().enumerate() {
            if let Type::Composite { name, .. } = ty
                && *name != 0
            {
                let name = btf.string(*name).to_owned();
                // The first definition wins (forward declarations are another kind).
                btf.structs_by_name.entry(name).or_insert(index as u32 + 1);
            }
        }
        Ok(btf)
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// The byte offset of `field` in struct or union `type_name`, looking through anonymous
    /// struct and union members as C does.
    pub fn member_offset(&self, type_name: &str, field: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("{type_name}.{field}"));
        let id = *self.structs_by_name.get(type_name).ok_or_else(missing)?;
        let bits = self.find(id, field, 0).ok_or_else(missing)?;
        if bits % 8 != 0 {
            return Err(missing());
        }
        Ok(bits / 8)
    }

    fn find(&self, id: u32, field: &str, depth: u32) -> Option<u32> {
        let Some(Type::Composite { members, .. }) = self.types.get(id.checked_sub(1)? as usize)
        else {
            return None;
        };
        for member in members {
            if member.name != 0 && self.string(member.name) == field {
                return Some(member.bit_offset);
            }
        }
        if depth > 8 {
            return None;
        }
        members
            .iter()
            .filter(|m| m.name == 0)
            .find_map(|m| Some(m.bit_offset + self.find(m.type_id, field, depth + 1)?))
    }
}

pub fn socket_offsets_from(btf: &Btf) -> Result<SocketOffsets, BtfError> {
    let at = |ty: &str, field: &str| btf.member_offset(ty, field);
    Ok(SocketOffsets {
        ctx_sk: at("bpf_sock_addr_kern", "sk")?,
        sk_cgroup: at("sock", "sk_cgrp_data")? + at("sock_cgroup_data", "cgroup")?,
        cgroup_kn: at("cgroup", "kn")?,
        kn_id: at("kernfs_node", "id")?,
        sk_socket: at("sock", "sk_socket")?,
        socket_file: at("socket", "file")?,
        file_cred: at("file", "f_cred")?,
        cred_uid: at("cred", "uid")?,
        cred_gid: at("cred", "gid")?,
        valid: 1,
    })
}

/// The task_struct offsets the connect programs need to name the connecting process image.
pub fn task_offsets_from(btf: &Btf) -> Result<TaskOffsets, BtfError> {
    let at = |field: &str| btf.member_offset("task_struct", field);
    Ok(TaskOffsets {
        group_leader: at("group_leader")?,
        start_boottime: at("start_boottime")?,
        self_exec_id: at("self_exec_id")?,
        valid: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF; without it the test skips, which fails under CI=true (as the
    /// end-to-end tests' skips do).
    fn running_kernel_btf() -> Option<Btf> {
        match Btf::from_sys_fs() {
            Ok(btf) => Some(btf),
            Err(error) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
                panic!("cannot run under CI: {error}")
            }
            Err(error) => {
                eprintln!("SKIP: {error}");
                None
            }
        }
    }

    #[test]
    fn the_running_kernels_socket_offsets_are_found() {
        let Some(btf) = running_kernel_btf() else {
            return;
        };
        let offsets = socket_offsets_from(&btf).expect("offsets");
        // bpf_sock_addr_kern starts with the socket pointer on every kernel with the hook.
        assert_eq!(offsets.ctx_sk, 0);
        // struct sock starts with sock_common, so its own fields are well past the start.
        assert!(
            offsets.sk_cgroup > 100 && offsets.sk_socket > 100,
            "{offsets:?}"
        );
        // kuid_t and kgid_t are adjacent in struct cred (uid, gid, suid, sgid, ...).
        assert_eq!(offsets.cred_gid, offsets.cred_uid + 4);
        assert!(matches!(
            btf.member_offset("sock", "no_such_field"),
            Err(BtfError::Missing(_))
        ));
        assert!(btf.member_offset("no_such_struct", "x").is_err());
    }

    #[test]
    fn the_running_kernels_task_offsets_are_found() {
        let Some(btf) = running_kernel_btf() else {
            return;
        };
        let offsets = task_offsets_from(&btf).expect("offsets");
        // parent_exec_id and self_exec_id are adjacent u64s (kernel >= 5.7).
        assert_eq!(
            offsets.self_exec_id,
            btf.member_offset("task_struct", "parent_exec_id").unwrap() + 8
        );
        // start_time (monotonic) comes right before start_boottime.
        assert_eq!(
            offsets.start_boottime,
            btf.member_offset("task_struct", "start_time").unwrap() + 8
        );
        assert!(
            offsets.group_leader > 0 && offsets.valid == 1,
            "{offsets:?}"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut header = vec![0x9f, 0xeb, 1, 0];
        for value in [24u32, 0, 1000, 0, 0] {
            header.extend_from_slice(&value.to_le_bytes());
        }
        assert!(Btf::parse(&header).is_err());
    }
}
