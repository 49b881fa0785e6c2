//! What an installation leaves in its pin directory: the links (which keep the programs
//! attached while the agent is away), the maps, and the counters read from them.

use std::{io, path::Path};

use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::links::{FdLink, PinnedLink},
};
use imds_common::{COUNTER_COUNT, Counter, MAP_COUNTERS};

use super::LoaderError;
use crate::fs;

pub(super) const LINK_CONNECT4: &str = "connect4";
pub(super) const LINK_CONNECT6: &str = "connect6";
pub(super) const LINK_SENDMSG4: &str = "sendmsg4";
pub(super) const LINK_SENDMSG6: &str = "sendmsg6";
pub(super) const LINK_SOCK_CREATE: &str = "sock_create";
/// The attribution program, on the cgroup the listening sockets were made in (see
/// `Enforcer::attach`).
pub(super) const LINK_GETPEERNAME4: &str = "getpeername4";
/// Every link an installation pins.
pub(super) const LINKS: [&str; 6] = [
    LINK_CONNECT4,
    LINK_CONNECT6,
    LINK_SENDMSG4,
    LINK_SENDMSG6,
    LINK_SOCK_CREATE,
    LINK_GETPEERNAME4,
];
/// Pinned by earlier versions, which an upgraded agent removes: a sock_ops program that
/// recorded pods' connections (unpinning the link detaches it) and its maps, and the callers
/// map of the 48-byte caller layout.
pub(super) const RETIRED_PINS: [&str; 4] =
    ["sock_ops", "IMDS_PENDING", "IMDS_CONNS", "IMDS_CALLERS"];

/// Whether an installation's links are pinned in `pin_dir`.
pub fn is_attached(pin_dir: &Path) -> bool {
    pin_dir.join(LINK_CONNECT4).exists()
}

/// Removes an installation: unpinning the links detaches the programs; unpinning the maps
/// frees them once no program uses them. Returns whether there was anything to remove.
pub fn detach(pin_dir: &Path) -> Result<bool, LoaderError> {
    let err = |source| LoaderError::Detach {
        path: pin_dir.to_owned(),
        source,
    };
    if !pin_dir.exists() {
        return Ok(false);
    }
    // Links first, so no program runs on maps that are going away.
    for link in LINKS.into_iter().chain(RETIRED_PINS) {
        remove_pin(pin_dir, link)?;
    }
    std::fs::remove_dir_all(pin_dir).map_err(err)?;
    Ok(true)
}

pub(super) fn prepare_pin_dir(pin_dir: &Path) -> Result<(), LoaderError> {
    if pin_dir.starts_with(fs::BPFFS_ROOT) {
        fs::ensure_bpffs().map_err(|source| LoaderError::Bpffs { source })?;
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| LoaderError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    if fs::is_bpffs(pin_dir) {
        Ok(())
    } else {
        Err(LoaderError::PinDirNotBpffs(pin_dir.to_owned()))
    }
}

/// Unpins a link (which detaches it); one that is not pinned is fine.
pub(super) fn remove_pin(pin_dir: &Path, name: &str) -> Result<(), LoaderError> {
    match std::fs::remove_file(pin_dir.join(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LoaderError::Detach {
            path: pin_dir.join(name),
            source,
        }),
    }
}

/// Pins `link` under a temporary name and renames it over `name`: the old link (if any) loses
/// its last reference and detaches only after the new one is attached and pinned.
pub(super) fn replace_pin(pin_dir: &Path, name: &str, link: FdLink) -> Result<(), LoaderError> {
    // bpffs refuses names with dots (reserved by the kernel).
    let tmp = pin_dir.join(format!("{name}_new"));
    let _ = std::fs::remove_file(&tmp);
    let pinned: PinnedLink = link.pin(&tmp).map_err(|source| LoaderError::Pin {
        path: tmp.clone(),
        source,
    })?;
    let path = pin_dir.join(name);
    std::fs::rename(&tmp, &path).map_err(|source| LoaderError::Rename { path, source })?;
    // Closing our fd is fine: the pin keeps the link.
    drop(pinned);
    Ok(())
}

/// Kernel-side counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub diverted: u64,
    pub passed: u64,
    pub refused: u64,
    pub bypassed: u64,
}

pub(super) fn read_counters(map: &PerCpuArray<MapData, u64>) -> Result<Counters, LoaderError> {
    let sum = |counter: Counter| -> Result<u64, LoaderError> {
        let values = map
            .get(&(counter as u32), 0)
            .map_err(|source| LoaderError::Map {
                name: MAP_COUNTERS,
                source,
            })?;
        Ok(values.iter().sum())
    };
    debug_assert_eq!(COUNTER_COUNT, 4);
    Ok(Counters {
        diverted: sum(Counter::Diverted)?,
        passed: sum(Counter::Passed)?,
        refused: sum(Counter::Refused)?,
        bypassed: sum(Counter::Bypassed)?,
    })
}

/// Reads the counters of an installation from its pinned map, without loading anything.
pub fn pinned_counters(pin_dir: &Path) -> Result<Counters, LoaderError> {
    let path = pin_dir.join(MAP_COUNTERS);
    let data = MapData::from_pin(&path).map_err(|source| LoaderError::Map {
        name: MAP_COUNTERS,
        source,
    })?;
    let map = PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|source| LoaderError::Map {
        name: MAP_COUNTERS,
        source,
    })?;
    read_counters(&map)
}
