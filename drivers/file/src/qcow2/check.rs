//! The qcow2 volume check (`VolumeCheck`): compares a volume's record (`chain.json`) with
//! what is on disk, each file's own qcow2 header above all, because qemu reads the headers
//! and kiln decides from the record: when they disagree, the next merge picks the wrong
//! path (`qemu-img commit` then fails with "Did not find '…' in the backing chain") or
//! drops a file a child still reads.
//!
//! What it finds: recorded files that are missing, not qcow2, unreadable, or whose header
//! names another backing file than the record; an active file whose size is not the
//! volume's; layer files the record does not name; temp files of interrupted operations;
//! files kiln never makes; snapshot deletes left pending by a crash.
//!
//! What `repair` does, only what cannot lose data: records the backing file a header names
//! when that file is recorded too and the record stays a valid tree; removes temp files;
//! then runs the volume's recovery, which finishes pending deletes (reading the headers,
//! see `Locked::delete_snapshot`) and removes unrecorded layers no header references.
//! Missing files, wrong formats, unreadable headers, unknown files and layers a header still
//! references are reported, never removed or rewritten.

use std::collections::BTreeMap;
use std::fmt;

use kiln_core::{CheckReport, Result, Volume};

use super::chain::Chain;
use super::qemu::{self, Header};
use super::{Locked, leftovers_of, volume_dir};
use crate::Backend;
use crate::sys::{self, Flock};

/// One inconsistency between the record and the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Finding {
    /// No record (`chain.json`) or no volume directory at all.
    NoRecord(String),
    /// The record cannot be read.
    BadRecord(String),
    /// A recorded file does not exist.
    Missing { file: String, role: String },
    /// A recorded file's header cannot be read.
    Unreadable { file: String, error: String },
    /// A recorded file is not a qcow2 image.
    WrongFormat { file: String, format: String },
    /// A recorded file's header names another backing file than the record.
    WrongBacking {
        file: String,
        header: Option<String>,
        record: Option<String>,
    },
    /// The active file's virtual size is not the volume's recorded size.
    WrongSize {
        file: String,
        header: u64,
        record: u64,
    },
    /// A layer file the record does not name; `referenced_by` are recorded files whose
    /// header names it as their backing file.
    Unrecorded {
        file: String,
        referenced_by: Vec<String>,
    },
    /// A temp file of an interrupted operation.
    Temp(String),
    /// A file kiln never creates in a volume directory.
    Unknown(String),
    /// A snapshot delete a crash interrupted.
    PendingDelete { snapshot: String, file: String },
}

fn name_or_none(n: &Option<String>) -> &str {
    n.as_deref().unwrap_or("<none>")
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::NoRecord(what) => write!(f, "no record: {what}"),
            Finding::BadRecord(e) => write!(f, "record unreadable: {e}"),
            Finding::Missing { file, role } => write!(f, "missing file: {file} ({role})"),
            Finding::Unreadable { file, error } => {
                write!(f, "unreadable header: {file}: {error}")
            }
            Finding::WrongFormat { file, format } => {
                write!(f, "wrong format: {file} is {format}, not qcow2")
            }
            Finding::WrongBacking {
                file,
                header,
                record,
            } => write!(
                f,
                "wrong backing file: the header of {file} names {}, the record {}",
                name_or_none(header),
                name_or_none(record)
            ),
            Finding::WrongSize {
                file,
                header,
                record,
            } => write!(
                f,
                "wrong size: active file {file} is {header} bytes, the record says {record}"
            ),
            Finding::Unrecorded {
                file,
                referenced_by,
            } if referenced_by.is_empty() => {
                write!(f, "extra file: {file} is not in the record")
            }
            Finding::Unrecorded {
                file,
                referenced_by,
            } => write!(
                f,
                "extra file: {file} is not in the record but the header of {} names it",
                referenced_by.join(", ")
            ),
            Finding::Temp(file) => write!(f, "stray temp file: {file}"),
            Finding::Unknown(file) => write!(f, "unexpected file: {file}"),
            Finding::PendingDelete { snapshot, file } => write!(
                f,
                "pending delete: snapshot {snapshot} (file {file}) was being deleted when kiln stopped"
            ),
        }
    }
}

/// Checks (and with `repair`, repairs) volume `v`. Takes the volume directory's flock, like
/// every operation, but does not run the recovery first: it must see what a crash left.
pub(crate) fn check_volume(b: &Backend, v: &Volume, repair: bool) -> Result<CheckReport> {
    let vdir = volume_dir(&b.dir, &v.id);
    let mut report = CheckReport::default();
    if !sys::exists(&vdir)? {
        report
            .findings
            .push(Finding::NoRecord(format!("{} does not exist", vdir.display())).to_string());
        return Ok(report);
    }
    let lock = match Flock::exclusive(&vdir, false) {
        Ok(l) => l,
        Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => {
            report
                .findings
                .push(Finding::NoRecord(format!("{} does not exist", vdir.display())).to_string());
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let chain = match Chain::load(&vdir) {
        Ok(Some(c)) => c,
        Ok(None) => {
            report.findings.push(
                Finding::NoRecord(format!("{} has no chain.json", vdir.display())).to_string(),
            );
            return Ok(report);
        }
        Err(e) => {
            report
                .findings
                .push(Finding::BadRecord(e.message().to_string()).to_string());
            return Ok(report);
        }
    };
    let mut l = Locked {
        dir: vdir,
        chain,
        _lock: lock,
    };
    let found = inspect(&l)?;
    report.findings = found.iter().map(Finding::to_string).collect();
    if !repair || found.is_empty() {
        report.consistent = found.is_empty();
        return Ok(report);
    }
    let (repaired, failure) = repair_volume(&mut l, &found)?;
    report.repaired = repaired;
    let left = inspect(&l)?;
    // What is left is in the findings already, unless the repair itself made it.
    for f in &left {
        if !report.findings.contains(&f.to_string()) {
            report.findings.push(f.to_string());
        }
    }
    if let Some(e) = failure {
        report.findings.push(format!("repair stopped: {e}"));
    }
    report.consistent = left.is_empty();
    Ok(report)
}

/// Compares the record with the directory; changes nothing.
fn inspect(l: &Locked) -> Result<Vec<Finding>> {
    let chain = &l.chain;
    let mut out = Vec::new();
    let mut headers: BTreeMap<&str, Header> = BTreeMap::new();
    for (name, layer) in &chain.files {
        if !sys::exists(&l.path(name))? {
            out.push(Finding::Missing {
                file: name.clone(),
                role: role(chain, name),
            });
            continue;
        }
        let h = match qemu::header(&l.dir, name) {
            Ok(h) => h,
            Err(e) => {
                out.push(Finding::Unreadable {
                    file: name.clone(),
                    error: e.message().to_string(),
                });
                continue;
            }
        };
        if h.format != "qcow2" {
            out.push(Finding::WrongFormat {
                file: name.clone(),
                format: h.format.clone(),
            });
        } else if h.backing != layer.backing {
            out.push(Finding::WrongBacking {
                file: name.clone(),
                header: h.backing.clone(),
                record: layer.backing.clone(),
            });
        }
        if *name == chain.active && h.virtual_size != chain.size_bytes {
            out.push(Finding::WrongSize {
                file: name.clone(),
                header: h.virtual_size,
                record: chain.size_bytes,
            });
        }
        headers.insert(name, h);
    }
    let left = leftovers_of(&l.dir, chain)?;
    for file in left.layers {
        let referenced_by = headers
            .iter()
            .filter(|(_, h)| h.backing.as_deref() == Some(file.as_str()))
            .map(|(n, _)| n.to_string())
            .collect();
        out.push(Finding::Unrecorded {
            file,
            referenced_by,
        });
    }
    out.extend(left.temps.into_iter().map(Finding::Temp));
    out.extend(left.unknown.into_iter().map(Finding::Unknown));
    for (id, e) in &chain.snapshots {
        if e.deleting {
            out.push(Finding::PendingDelete {
                snapshot: id.clone(),
                file: e.file.clone(),
            });
        }
    }
    Ok(out)
}

/// What a recorded file is, for messages.
fn role(chain: &Chain, file: &str) -> String {
    let snaps: Vec<&str> = chain
        .snapshots
        .iter()
        .filter(|(_, e)| e.file == file)
        .map(|(id, _)| id.as_str())
        .collect();
    match (file == chain.active, snaps.is_empty()) {
        (true, _) => "the volume's active file".into(),
        (false, false) => format!("the image of snapshot {}", snaps.join(", ")),
        (false, true) => "a layer".into(),
    }
}

/// Repairs what is safe (see the module docs). Returns the repairs made, and why repairing
/// stopped early if it did.
fn repair_volume(l: &mut Locked, found: &[Finding]) -> Result<(Vec<String>, Option<String>)> {
    let mut done = Vec::new();
    for f in found {
        if let Finding::Temp(file) = f
            && sys::remove_if_exists(&l.path(file))?
        {
            done.push(format!("removed stray temp file {file}"));
        }
    }
    // The headers are what qemu reads: make the record say the same, one file at a time,
    // keeping only changes after which the record is still a valid tree.
    let mut next = l.chain.clone();
    let mut recorded = Vec::new();
    for f in found {
        let Finding::WrongBacking {
            file,
            header,
            record,
        } = f
        else {
            continue;
        };
        if header.as_ref().is_some_and(|h| !next.files.contains_key(h)) {
            continue; // names a file the record does not hold: reported, not guessed
        }
        let Some(layer) = next.files.get_mut(file) else {
            continue;
        };
        layer.backing = header.clone();
        if next.validate().is_err() {
            if let Some(layer) = next.files.get_mut(file) {
                layer.backing = record.clone();
            }
            continue;
        }
        recorded.push(format!(
            "recorded {file} as backed by {} (as its qcow2 header says), not {}",
            name_or_none(header),
            name_or_none(record)
        ));
    }
    if !recorded.is_empty() {
        next.save(&l.dir)?;
        l.chain = next;
        done.extend(recorded);
    }
    // What every operation does first: finish pending deletes (each step checked against
    // the headers) and remove unrecorded layers that no header references.
    let pending: Vec<String> = l
        .chain
        .snapshots
        .iter()
        .filter(|(_, e)| e.deleting)
        .map(|(id, _)| id.clone())
        .collect();
    let unrecorded: Vec<String> = found
        .iter()
        .filter_map(|f| match f {
            Finding::Unrecorded { file, .. } => Some(file.clone()),
            _ => None,
        })
        .collect();
    let failure = l.recover().err().map(|e| e.message().to_string());
    if failure.is_some() {
        // The record on disk is what recovery left; reload it for the second inspection.
        if let Some(c) = Chain::load(&l.dir)? {
            l.chain = c;
        }
    }
    for id in pending {
        match l.chain.snapshots.get(&id) {
            None => done.push(format!("finished the interrupted delete of snapshot {id}")),
            Some(e) if !e.deleting => done.push(format!(
                "abandoned the interrupted delete of snapshot {id} (the snapshot stays)"
            )),
            Some(_) => {}
        }
    }
    for file in unrecorded {
        if !sys::exists(&l.path(&file))? {
            done.push(format!("removed unrecorded layer {file}"));
        }
    }
    Ok((done, failure))
}
