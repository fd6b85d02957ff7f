//! Snapshots of qcow2 volumes that a running hypervisor has open. A file in use must never
//! be modified by another process, so the hypervisor itself switches each disk onto a new
//! overlay: kiln creates the overlay file next to the active one (backed by it), opens it in
//! the hypervisor with QMP `blockdev-add` (`backing: null`), and puts it on top of the disk's
//! current top node with one QMP `transaction` of `blockdev-snapshot` actions — one per
//! volume, so several volumes of one instance switch at one instant. The guest keeps writing
//! through the same export, into the overlay, without reconnecting.
//!
//! Crash safety: the intent ([`OnlineSnapshot`]: snapshot, overlay, monitor, overlay node) is
//! committed in the volume's record before QMP is asked anything, and the record says which
//! file is active only after QMP confirmed. Whoever locks the volume next (recovery) asks the
//! monitor whether the overlay node sits on top of the disk (then the snapshot is recorded)
//! or not (then the overlay node and file are removed). An overlay that holds data of its own
//! is never removed: the guest wrote into it, so the switch happened.

use std::path::Path;

use kiln_core::hypervisor::qmp::{BlockNode, Qmp};
use kiln_core::hypervisor::{self, Monitor};
use kiln_core::{Attachment, Error, ErrorKind, ProviderUpdate, Result, Snapshot, Volume};

use super::chain::{Layer, OnlineDelete, OnlineSnapshot, SnapshotEntry, new_layer_name};
use super::{Locked, check_depth, fsync_file, location, lock_required, qemu};
use crate::Backend;
use crate::sys;

/// One member of an online snapshot: the snapshot to take of the volume and its attachment.
pub(crate) type Member<'a> = (&'a Snapshot, &'a Volume, &'a Attachment);

/// The node name kiln gives the overlay file `layer-<uuid>.qcow2`: `kiln-` and the first 26
/// hex digits of the uuid (QEMU allows at most 31 characters, starting with a letter).
fn overlay_node(layer: &str) -> String {
    let hex: String = layer
        .trim_start_matches("layer-")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(26)
        .collect();
    format!("kiln-{hex}")
}

/// The top node serving `active` (the volume's active file): the format node that has it
/// open, or else — when the hypervisor opened the file under another path — the node given
/// at attach time, if it exists. `None`: the hypervisor does not serve the volume.
fn top_node(nodes: &[BlockNode], active: &Path, given: Option<&str>) -> Option<String> {
    let same = |f: &str| {
        let f = Path::new(f);
        f == active || std::fs::canonicalize(f).ok().as_deref() == Some(active)
    };
    nodes
        .iter()
        .find(|n| n.driver == "qcow2" && same(&n.image_file()))
        .or_else(|| {
            given.and_then(|g| {
                nodes
                    .iter()
                    .find(|n| n.node_name == g && n.driver == "qcow2")
            })
        })
        .map(|n| n.node_name.clone())
}

/// The same failure, once per member.
fn copy_err(e: &Error) -> Error {
    Error::new(e.kind(), e.to_string())
}

/// Snapshots every member (all attached through the monitor at `qmp`) at one instant: one
/// QMP transaction. All or nothing up to the transaction: when QEMU refuses, every member
/// gets the error and nothing changed — no overlay file, no node, the records as they were;
/// when the monitor does not answer, every member gets the error and its intent stays for
/// recovery to settle with the monitor. After the transaction each member's record is
/// committed on its own, and reports its own result.
pub(crate) fn create_snapshots(
    b: &Backend,
    qmp: &str,
    members: &[Member<'_>],
) -> Vec<Result<ProviderUpdate>> {
    match create_all(b, qmp, members) {
        Ok(results) => results,
        Err(e) => members.iter().map(|_| Err(copy_err(&e))).collect(),
    }
}

/// One member while it is being switched: its locked directory and what kiln made for it.
struct Switching {
    locked: Locked,
    snapshot: String,
    frozen: String,
    overlay: String,
    node: String,
    top: String,
    /// Already recorded (a re-run of a snapshot that was taken).
    done: Option<ProviderUpdate>,
    /// The member's outcome once the transaction ran.
    result: Option<Result<ProviderUpdate>>,
}

fn create_all(
    b: &Backend,
    qmp: &str,
    members: &[Member<'_>],
) -> Result<Vec<Result<ProviderUpdate>>> {
    for (s, v, _) in members {
        if s.volume_id != v.id {
            return Err(Error::invalid(
                "snapshot",
                format!(
                    "snapshot {} belongs to volume {}, not {}",
                    s.id, s.volume_id, v.id
                ),
            ));
        }
    }
    // Lock in volume id order (two group snapshots over the same volumes cannot deadlock);
    // each lock recovers whatever a crash left on its volume first.
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by_key(|&i| members[i].1.id);
    let mut slots: Vec<Option<Switching>> = members.iter().map(|_| None).collect();
    for &i in &order {
        let (s, v, _) = members[i];
        let l = lock_required(&b.dir, &v.id)?;
        let sid = s.id.to_string();
        let done = l
            .chain
            .snapshots
            .get(&sid)
            .map(|e| location(&l.path(&e.file)));
        if done.is_none() {
            check_depth(&l.chain, v)?;
        }
        let frozen = l.chain.active.clone();
        let overlay = new_layer_name();
        slots[i] = Some(Switching {
            snapshot: sid,
            node: overlay_node(&overlay),
            frozen,
            overlay,
            top: String::new(),
            done,
            result: None,
            locked: l,
        });
    }
    let mut sw: Vec<Switching> = slots.into_iter().flatten().collect();
    if sw.len() != members.len() {
        return Err(Error::backend("online snapshot", "a member was not locked"));
    }
    hypervisor::with_live_monitor(qmp, |q| switch(q, qmp, members, &mut sw))?;
    Ok(sw
        .into_iter()
        .map(|m| match (m.done, m.result) {
            (Some(done), _) => Ok(done),
            (None, Some(r)) => r,
            (None, None) => Err(Error::backend("online snapshot", "member not taken")),
        })
        .collect())
}

/// With the monitor held: find each disk's top node, create and record the overlays, open
/// them, run the one transaction, record the result.
fn switch(q: &mut Qmp, qmp: &str, members: &[Member<'_>], sw: &mut [Switching]) -> Result<()> {
    let nodes = q.block_nodes()?;
    for (m, (_, v, a)) in sw.iter_mut().zip(members) {
        if m.done.is_some() {
            continue;
        }
        let active = m.locked.path(&m.frozen);
        m.top = top_node(&nodes, &active, a.node.as_deref()).ok_or_else(|| {
            Error::wrong_state(format!(
                "volume {} is attached to instance {}, but the hypervisor at {qmp} has no \
                 block node on its active file {} (is the volume open there? give the node \
                 with `volume attach --node`)",
                v.id,
                a.instance_id,
                active.display()
            ))
        })?;
    }
    let todo: Vec<usize> = (0..sw.len()).filter(|&i| sw[i].done.is_none()).collect();
    if todo.is_empty() {
        return Ok(());
    }
    // Overlay files first, outside the critical section (QEMU would otherwise create them
    // while the guest's I/O is drained), each recorded as in flight before QMP sees it.
    let mut prepared = Vec::new();
    let mut failure = None;
    for &i in &todo {
        match prepare(&mut sw[i], qmp) {
            Ok(()) => prepared.push(i),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    kiln_core::crash::crash_point("qcow2_online", "before_qmp");
    let mut added = Vec::new();
    if failure.is_none() {
        for &i in &prepared {
            match q.add_overlay(&sw[i].node, &sw[i].locked.path(&sw[i].overlay)) {
                Ok(()) => added.push(i),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    kiln_core::crash::crash_point("qcow2_online", "after_add");
    if failure.is_none() {
        let pairs: Vec<(String, String)> = prepared
            .iter()
            .map(|&i| (sw[i].top.clone(), sw[i].node.clone()))
            .collect();
        if let Err(e) = q.snapshot_transaction(&pairs) {
            failure = Some(e);
        }
    }
    if let Some(e) = failure {
        if hypervisor::is_unreachable(&e) {
            // No answer: QEMU may still have added the node or switched (a busy disk can
            // take longer to drain than the wait). Every intent stays, so whoever locks the
            // volume next asks the monitor: never unlink an overlay the guest may write.
            return Err(e);
        }
        // QEMU refused (or nothing reached it): a transaction is all or nothing, so nothing
        // switched. Take back what was added; an overlay whose node cannot be removed keeps
        // its intent (recovery asks again), the others go.
        let mut keep = vec![false; sw.len()];
        for &i in &added {
            if let Err(d) = q.delete_node(&sw[i].node) {
                tracing::warn!(node = %sw[i].node, error = %d, "cannot remove the overlay node kiln added; recovery settles it");
                keep[i] = true;
            }
        }
        for &i in prepared.iter().filter(|&&i| !keep[i]) {
            if let Err(d) = abandon(&mut sw[i].locked) {
                tracing::warn!(volume = %sw[i].locked.chain.volume_id, error = %d, "cannot remove an unused overlay; the next operation on the volume retries");
            }
        }
        return Err(e);
    }
    kiln_core::crash::crash_point("qcow2_online", "after_transaction");
    // Every member switched; each record is its own commit (one may fail alone, then only
    // that member reports it, and recovery records it from the monitor later).
    for &i in &prepared {
        let m = &mut sw[i];
        m.result = Some(switched(&mut m.locked).map(|()| location(&m.locked.path(&m.frozen))));
    }
    Ok(())
}

/// Creates member `m`'s overlay file (backed by the active file, which qemu-img may read
/// while the hypervisor writes it: it opens a backing file shared) and commits the intent.
fn prepare(m: &mut Switching, qmp: &str) -> Result<()> {
    let l = &mut m.locked;
    qemu::create_overlay(&l.dir, &m.frozen, &m.overlay)?;
    fsync_file(&l.path(&m.overlay))?;
    sys::fsync_dir(&l.dir)?;
    l.chain.online = Some(OnlineSnapshot {
        snapshot: m.snapshot.clone(),
        overlay: m.overlay.clone(),
        qmp: qmp.to_string(),
        overlay_node: m.node.clone(),
    });
    if let Err(e) = l.commit() {
        l.chain.online = None;
        let _ = sys::remove_if_exists(&l.path(&m.overlay));
        return Err(e);
    }
    Ok(())
}

/// The hypervisor switched: the overlay is the active file, the old one is the snapshot's.
fn switched(l: &mut Locked) -> Result<()> {
    let Some(o) = l.chain.online.clone() else {
        return Ok(());
    };
    let frozen = l.chain.active.clone();
    l.chain.files.insert(
        o.overlay.clone(),
        Layer {
            backing: Some(frozen.clone()),
        },
    );
    l.chain.snapshots.insert(
        o.snapshot.clone(),
        SnapshotEntry {
            file: frozen,
            size_bytes: l.chain.size_bytes,
            deleting: false,
            commit_child: None,
            online_delete: None,
        },
    );
    l.chain.active = o.overlay;
    l.chain.online = None;
    l.chain.hypervisor = Some(o.qmp);
    l.commit()
}

/// The hypervisor did not switch: forget the intent, then remove the overlay file.
fn abandon(l: &mut Locked) -> Result<()> {
    let Some(o) = l.chain.online.take() else {
        return Ok(());
    };
    if let Err(e) = l.commit() {
        l.chain.online = Some(o);
        return Err(e);
    }
    sys::remove_if_exists(&l.path(&o.overlay)).map(drop)
}

/// Settles an online snapshot a crash interrupted (called with the volume locked, before
/// anything else reads the record): asks the monitor whether the overlay node is on top of
/// the disk. When the monitor cannot be asked, the overlay is kept unless the hypervisor is
/// gone and the overlay holds nothing of its own; then the error says what blocks the volume.
pub(super) fn recover(l: &mut Locked) -> Result<()> {
    let Some(o) = l.chain.online.clone() else {
        return Ok(());
    };
    let overlay_path = l.path(&o.overlay);
    let frozen_path = l.path(&l.chain.active);
    if o.snapshot.starts_with(BENCH_PREFIX) {
        return recover_bench(l, &o);
    }
    let verdict = hypervisor::with_monitor(&o.qmp, |m| match m {
        Monitor::Up(q) => {
            let nodes = q.block_nodes()?;
            let Some(node) = nodes.iter().find(|n| n.node_name == o.overlay_node) else {
                return Ok(Verdict::NotSwitched);
            };
            if node.backing_file.is_some() {
                return Ok(Verdict::Switched);
            }
            // Added but never put on top: take it out again.
            q.delete_node(&o.overlay_node)?;
            Ok(Verdict::NotSwitched)
        }
        Monitor::Gone(_) => Ok(Verdict::HypervisorGone),
    });
    let verdict = match verdict {
        Ok(v) => v,
        Err(e) if hypervisor::is_unreachable(&e) => {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "volume {}: an online snapshot was interrupted and its hypervisor's monitor \
                     cannot be asked whether it switched to {} ({e}); retry when the monitor \
                     answers",
                    l.chain.volume_id,
                    overlay_path.display()
                ),
            ));
        }
        Err(e) => return Err(e),
    };
    if matches!(verdict, Verdict::HypervisorGone) && qemu::is_held(&l.dir, &l.chain.active)? {
        // The socket is gone but something holds the volume's files (a removed socket does
        // not prove a dead daemon): deciding now could unlink a file in use.
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "volume {}: an online snapshot was interrupted; its hypervisor's monitor {} \
                 is gone but another process holds {}; retry when it answers or lets go",
                l.chain.volume_id,
                o.qmp,
                frozen_path.display()
            ),
        ));
    }
    let keep = match verdict {
        Verdict::Switched => true,
        // Never created: nothing was switched to it.
        _ if !sys::exists(&overlay_path)? => false,
        // Data of its own: the guest wrote into it, so it was switched to (and the hypervisor
        // restarted, or died); dropping it would lose those writes.
        Verdict::NotSwitched | Verdict::HypervisorGone => {
            qemu::has_own_clusters(&l.dir, &o.overlay)?
        }
    };
    tracing::info!(
        volume = %l.chain.volume_id,
        snapshot = %o.snapshot,
        overlay = %overlay_path.display(),
        frozen = %frozen_path.display(),
        ?verdict,
        recorded = keep,
        "settling an interrupted online snapshot"
    );
    if keep { switched(l) } else { abandon(l) }
}

/// What the monitor says about an interrupted switch.
#[derive(Debug)]
enum Verdict {
    /// The overlay node is in the graph with a backing: the transaction ran.
    Switched,
    /// The overlay node is not on top of anything (now removed, or never added).
    NotSwitched,
    /// Nothing listens on the monitor socket.
    HypervisorGone,
}

// ------------------------------------------------------------------ online snapshot delete

/// The monitor through which the hypervisor that took the volume's last online snapshot
/// still has its active file open, if it does: a snapshot delete must then go through it
/// (qemu-img would be refused by the image locks, or worse). `None`: nobody recorded, the
/// hypervisor is gone, or it no longer has the file open — the files are kiln's to merge.
pub(super) fn serving_monitor(l: &Locked) -> Result<Option<String>> {
    let Some(qmp) = l.chain.hypervisor.clone() else {
        return Ok(None);
    };
    let active = l.path(&l.chain.active);
    hypervisor::with_monitor(&qmp, |m| match m {
        Monitor::Gone(_) => Ok(None),
        Monitor::Up(q) => Ok(top_node(&q.block_nodes()?, &active, None).map(|_| qmp.clone())),
    })
}

/// A QMP job id for deleting snapshot `id`.
fn delete_job_id(id: &str) -> String {
    let hex: String = id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(20)
        .collect();
    format!("kiln-del-{hex}")
}

/// The block nodes a merge of snapshot file `file` into (or from) its one child `child`
/// needs: the child's, the file's, and in stream mode the file's parent's (when it has one).
struct MergeNodes {
    child: String,
    file: String,
    parent: Option<String>,
}

/// Finds the [`MergeNodes`] in the hypervisor's graph; `None` when it does not have those
/// layers open.
fn merge_nodes(
    l: &Locked,
    nodes: &[BlockNode],
    child: &str,
    file: &str,
    parent: Option<&str>,
    stream: bool,
) -> Option<MergeNodes> {
    let node_of = |f: &str| top_node(nodes, &l.path(f), None);
    let parent = match (stream, parent) {
        (true, Some(p)) => Some(node_of(p)?),
        _ => None,
    };
    Some(MergeNodes {
        child: node_of(child)?,
        file: node_of(file)?,
        parent,
    })
}

/// Deletes snapshot `id` of a volume whose chain the hypervisor at `qmp` has open, by a QMP
/// block job: the snapshot's file `F` must have exactly one child `C` (the hypervisor's
/// chain; branches are merged offline, after a detach). `C` the active file → active
/// `block-commit` of `C` into `F`, which becomes the active file (costs `C`'s data, the
/// usual case: the newest snapshot); otherwise `block-stream` of `F` into `C`, which is then
/// backed by `F`'s parent (costs `F`'s data). Nothing is recorded until the hypervisor is
/// known to have every layer open; then the intent, with the job's id, is recorded first,
/// and the record changes again only once the job concluded and the graph shows its result.
pub(super) fn delete_snapshot(
    l: &mut Locked,
    id: &str,
    qmp: &str,
    progress: &kiln_core::ProgressHandle,
) -> Result<()> {
    let Some(entry) = l.chain.snapshots.get(id).cloned() else {
        return Ok(());
    };
    let children = l.chain.children(&entry.file);
    let [child] = children.as_slice() else {
        return Err(Error::wrong_state(format!(
            "snapshot {id} of volume {} cannot be merged while the hypervisor at {qmp} has the \
             volume open: its file has {} child layers (branches from earlier reverts); \
             detach the volume first",
            l.chain.volume_id,
            children.len()
        )));
    };
    let stream = *child != l.chain.active;
    let parent = l
        .chain
        .files
        .get(&entry.file)
        .and_then(|x| x.backing.clone());
    hypervisor::with_live_monitor(qmp, |q| {
        merge_nodes(
            l,
            &q.block_nodes()?,
            child,
            &entry.file,
            parent.as_deref(),
            stream,
        )
        .map(drop)
        .ok_or_else(|| {
            Error::wrong_state(format!(
                "snapshot {id} of volume {} cannot be merged by the hypervisor at {qmp}: \
                     it does not have the snapshot's layers open (a branch from an earlier \
                     revert?); detach the volume first",
                l.chain.volume_id
            ))
        })
    })?;
    if let Some(e) = l.chain.snapshots.get_mut(id) {
        e.deleting = true;
        e.commit_child = None;
        e.online_delete = Some(OnlineDelete {
            qmp: qmp.to_string(),
            job: delete_job_id(id),
            mode: if stream { "stream" } else { "commit" }.to_string(),
            child: child.clone(),
        });
    }
    if let Err(e) = l.commit() {
        if let Some(en) = l.chain.snapshots.get_mut(id) {
            *en = entry;
        }
        return Err(e);
    }
    kiln_core::crash::crash_point("qcow2_online", "before_job");
    resume_delete(l, id, progress)
}

/// What became of an online delete.
enum Ran {
    /// Settled in the record (done, or given up with the snapshot kept).
    Settled,
    /// The hypervisor no longer has the layers open (it is gone, or does not serve them):
    /// the files are kiln's again, and the offline merge finishes it.
    Offline,
}

/// Drives the recorded online delete of snapshot `id` to its end: waits for its job, or
/// starts it when the monitor does not know it (never started, or the hypervisor
/// restarted), then records the outcome. Also what recovery calls for an online delete a
/// crash interrupted.
pub(super) fn resume_delete(
    l: &mut Locked,
    id: &str,
    progress: &kiln_core::ProgressHandle,
) -> Result<()> {
    let Some(od) = l
        .chain
        .snapshots
        .get(id)
        .and_then(|e| e.online_delete.clone())
    else {
        return Ok(());
    };
    let ran = hypervisor::with_monitor(&od.qmp.clone(), |m| match m {
        Monitor::Gone(_) => Ok(Ran::Offline),
        Monitor::Up(q) => run_delete_job(l, q, id, &od, progress),
    })?;
    match ran {
        Ran::Settled => Ok(()),
        Ran::Offline => {
            // Nothing may have the files open before kiln writes them: a socket that is gone
            // does not prove its daemon is (qemu's image locks do).
            let active = l.chain.active.clone();
            if qemu::is_held(&l.dir, &active)? {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "volume {}: the merge of snapshot {id} cannot be finished: its \
                         hypervisor's monitor {} does not serve it, but another process holds \
                         {}",
                        l.chain.volume_id,
                        od.qmp,
                        l.path(&active).display()
                    ),
                ));
            }
            tracing::info!(volume = %l.chain.volume_id, snapshot = %id, "the hypervisor does not have the volume open; finishing the snapshot delete offline");
            if let Some(e) = l.chain.snapshots.get_mut(id) {
                e.online_delete = None;
                // Commit mode may have written C's clusters into F already: only the
                // offline commit (roll forward) is right then. Stream mode never changed
                // what any file shows: the offline rebase path.
                e.commit_child = (od.mode == "commit").then(|| od.child.clone());
            }
            l.commit()?;
            l.delete_snapshot(id)
        }
    }
}

/// Forgets a recorded online delete whose job never ran, or a stream (which never changes
/// what a file shows): the snapshot stays as it was.
fn give_up(l: &mut Locked, id: &str) -> Result<()> {
    if let Some(e) = l.chain.snapshots.get_mut(id) {
        e.deleting = false;
        e.online_delete = None;
    }
    l.commit()
}

/// Whether the hypervisor's graph shows child node `child` backed by `parent` (a layer name;
/// `None`: by nothing) — the result of a finished stream.
fn stream_done(nodes: &[BlockNode], child: &str, parent: Option<&String>) -> bool {
    let name = |b: &str| {
        Path::new(b)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
    };
    nodes
        .iter()
        .find(|x| x.node_name == child)
        .is_some_and(|x| x.backing_file.as_deref().and_then(name).as_ref() == parent)
}

fn run_delete_job(
    l: &mut Locked,
    q: &mut Qmp,
    id: &str,
    od: &OnlineDelete,
    progress: &kiln_core::ProgressHandle,
) -> Result<Ran> {
    let file = l
        .chain
        .snapshots
        .get(id)
        .map(|e| e.file.clone())
        .unwrap_or_default();
    let parent = l.chain.files.get(&file).and_then(|x| x.backing.clone());
    let stream = od.mode == "stream";
    // QEMU 10.0 drops the monitor connection when `query-named-block-nodes` runs while a
    // concluded stream job waits to be dismissed (reproduced with qemu-storage-daemon
    // 10.0.2). A stream's result is in the graph anyway, so its job is dismissed before the
    // graph is read; a commit's job is kept until the record is settled.
    let found = q.jobs()?.into_iter().find(|j| j.id == od.job);
    if stream && found.as_ref().is_some_and(|j| j.status == "concluded") {
        q.dismiss_job(&od.job)?;
    }
    let nodes = q.block_nodes()?;
    let Some(n) = merge_nodes(l, &nodes, &od.child, &file, parent.as_deref(), stream) else {
        return Ok(Ran::Offline);
    };
    if found.is_none() {
        // Not started, or its result only lacks the record: a stream shows in the graph; a
        // commit that switched (and whose job someone else dismissed) leaves the old active
        // node used by nothing.
        let done = if stream {
            stream_done(&nodes, &n.child, parent.as_ref())
        } else {
            q.delete_node(&n.child).is_ok()
        };
        if done {
            return settle(l, q, id, od, &file, parent, &n).map(|()| Ran::Settled);
        }
        let mut args = if stream {
            let mut a = serde_json::json!({
                "job-id": od.job, "device": n.child, "auto-dismiss": false,
            });
            if let (Some(pn), Some(p)) = (&n.parent, &parent) {
                a["base-node"] = pn.clone().into();
                // The child's header names its new backing file as kiln records it
                // (relative), not as the hypervisor opened it.
                a["backing-file"] = p.clone().into();
            }
            a
        } else {
            serde_json::json!({
                "job-id": od.job, "device": n.child, "base-node": n.file,
                "auto-dismiss": false,
            })
        };
        // Tests slow the merge down from its start, so that it surely still runs when they
        // kill kiln under it (a small merge can end before anyone could slow it later).
        if let Some(speed) = kiln_core::crash::fail_value("qcow2_online::merge_speed")
            .and_then(|v| v.parse::<u64>().ok())
        {
            args["speed"] = speed.into();
        }
        let cmd = if stream {
            "block-stream"
        } else {
            "block-commit"
        };
        tracing::info!(volume = %l.chain.volume_id, snapshot = %id, job = %od.job, cmd, "merging a snapshot of an attached volume in the hypervisor");
        if let Err(e) = q.execute(cmd, Some(args)) {
            if !hypervisor::is_unreachable(&e) {
                // Refused: the job never ran, no file changed.
                give_up(l, id)?;
            }
            return Err(e);
        }
    }
    let job = match found {
        Some(j) if j.status == "concluded" => j,
        _ => {
            let vol = l.chain.volume_id.clone();
            let (mut next_log, mut reported, mut known_total) = (0u64, 0u64, 0u64);
            let j = q.finish_job(&od.job, |done, total| {
                if total != known_total {
                    progress.set_total(total);
                    known_total = total;
                }
                if done > reported {
                    progress.advance(done - reported);
                    reported = done;
                }
                let pct = done.saturating_mul(100).checked_div(total).unwrap_or(0);
                if pct >= next_log {
                    tracing::info!(volume = %vol, job = %od.job, done, total, "merge {pct}% done");
                    next_log = pct + 25;
                }
            })?;
            kiln_core::crash::crash_point("qcow2_online", "after_job");
            if stream {
                q.dismiss_job(&od.job)?;
            }
            j
        }
    };
    let failed = |why: String| {
        Error::backend(
            "delete snapshot",
            format!("the hypervisor's {} job {}: {why}", od.mode, od.job),
        )
    };
    if let Some(err) = job.error {
        if stream {
            // A stream never changes what a file shows: the snapshot is intact, keep it.
            give_up(l, id)?;
        } else {
            // A failed commit may have written part of the child into the snapshot's file:
            // the intent stays and the next operation on the volume runs the job again.
            let _ = q.dismiss_job(&od.job);
        }
        return Err(failed(format!("failed: {err}")));
    }
    // Concluded without an error is not proof of the switch: a commit cancelled at `ready`
    // (block-job-cancel without force) ends that way too. The graph decides.
    let switched = if stream {
        stream_done(&q.block_nodes()?, &n.child, parent.as_ref())
    } else {
        // The old active node is free (no parent uses it) only once the hypervisor switched.
        q.delete_node(&n.child).is_ok()
    };
    if !switched {
        if stream {
            give_up(l, id)?;
        } else {
            let _ = q.dismiss_job(&od.job);
        }
        return Err(failed(
            "ended without switching the disk over (cancelled?); the snapshot stays, and a \
             commit's merge is run again by the next operation on the volume"
                .into(),
        ));
    }
    settle(l, q, id, od, &file, parent, &n)?;
    Ok(Ran::Settled)
}

/// Records a merge the hypervisor finished, then lets go of what it no longer needs: the
/// job, the merged layer's kiln node, its file.
fn settle(
    l: &mut Locked,
    q: &mut Qmp,
    id: &str,
    od: &OnlineDelete,
    file: &str,
    parent: Option<String>,
    n: &MergeNodes,
) -> Result<()> {
    let (gone, gone_node) = if od.mode == "commit" {
        l.chain.active = file.to_string();
        l.chain.files.remove(&od.child);
        (od.child.clone(), None)
    } else {
        if let Some(layer) = l.chain.files.get_mut(&od.child) {
            layer.backing = parent;
        }
        l.chain.files.remove(file);
        (file.to_string(), Some(n.file.clone()))
    };
    l.chain.snapshots.remove(id);
    l.commit()?;
    let _ = q.dismiss_job(&od.job);
    if let Some(node) = gone_node.filter(|n| n.starts_with("kiln-"))
        && let Err(e) = q.delete_node(&node)
    {
        tracing::warn!(node = %node, error = %e, "cannot remove the merged layer's node");
    }
    sys::remove_if_exists(&l.path(&gone))?;
    sys::fsync_dir(&l.dir)?;
    Ok(())
}

// ------------------------------------------------------------------ bench primitive

/// Prefix of the snapshot name an online intent carries when the bench made it (no
/// snapshot record exists for it: recovery undoes it instead of recording it).
const BENCH_PREFIX: &str = "bench-";

/// The bare sequences a tool runs to snapshot and merge back a disk that the hypervisor at
/// `qmp` has open, timed on volume `l` (locked): sample 1 "the primitive" — `qemu-img
/// create -b` of the overlay, `blockdev-add`, one-action `transaction`; and its delete, an
/// active `block-commit` of the overlay back into the disk's top + `job-complete`,
/// `blockdev-del`, unlink. Sample 2 — `blockdev-add` + `transaction` alone, the overlay
/// created beforehand (untimed), then the same delete. All on one monitor connection opened
/// before the timers. The volume's record is never changed, but an intent naming the
/// overlay is committed (untimed) around each, so that a crash mid-bench is undone by
/// recovery like an interrupted online snapshot, never leaving the guest writing into a file
/// the record does not know.
pub(super) fn bench(
    l: &mut Locked,
    qmp: &str,
    given: Option<&str>,
) -> Result<Vec<kiln_core::PrimitiveSample>> {
    use std::time::Instant;
    let active = l.path(&l.chain.active);
    hypervisor::with_live_monitor(qmp, |q| {
        let top = top_node(&q.block_nodes()?, &active, given).ok_or_else(|| {
            Error::wrong_state(format!(
                "the hypervisor at {qmp} has no block node on {}",
                active.display()
            ))
        })?;
        let mut samples = Vec::new();
        for (name, timed_file) in [
            (
                "qemu-img create -b + blockdev-add + transaction (blockdev-snapshot) / \
                 block-commit (active) + job-complete + blockdev-del + unlink",
                true,
            ),
            (
                "blockdev-add + transaction, overlay pre-created / the same delete",
                false,
            ),
        ] {
            let overlay = new_layer_name();
            let node = overlay_node(&overlay);
            l.chain.online = Some(OnlineSnapshot {
                snapshot: format!("{BENCH_PREFIX}{}", uuid::Uuid::new_v4().hyphenated()),
                overlay: overlay.clone(),
                qmp: qmp.to_string(),
                overlay_node: node.clone(),
            });
            l.commit()?;
            let frozen = l.chain.active.clone();
            let path = l.path(&overlay);
            let sample = (|| {
                if !timed_file {
                    qemu::create_overlay(&l.dir, &frozen, &overlay)?;
                }
                let t = Instant::now();
                if timed_file {
                    qemu::create_overlay(&l.dir, &frozen, &overlay)?;
                }
                q.add_overlay(&node, &path)?;
                q.snapshot_transaction(&[(top.clone(), node.clone())])?;
                let create = t.elapsed();
                kiln_core::crash::crash_point("qcow2_online", "bench_switched");
                let t = Instant::now();
                commit_back(q, &node, &top)?;
                std::fs::remove_file(&path)
                    .map_err(|e| Error::io(format!("unlink {}", path.display()), e))?;
                sys::fsync_dir(&l.dir)?;
                Ok(kiln_core::PrimitiveSample {
                    name: name.into(),
                    create,
                    delete: t.elapsed(),
                })
            })();
            if sample.is_err() {
                // Whatever state the hypervisor is in, recovery settles the intent next.
                return sample.map(|s| vec![s]);
            }
            l.chain.online = None;
            l.commit()?;
            samples.push(sample?);
        }
        Ok(samples)
    })
}

/// The job id of the bench's merge of overlay node `node` back into the disk.
fn bench_job_id(node: &str) -> String {
    format!(
        "kiln-bench-{}",
        node.trim_start_matches("kiln-")
            .chars()
            .take(12)
            .collect::<String>()
    )
}

/// Merges the bench overlay node `node` back into `top` (an active commit, waited for),
/// then removes the node.
fn commit_back(q: &mut Qmp, node: &str, top: &str) -> Result<()> {
    let job = bench_job_id(node);
    q.execute(
        "block-commit",
        Some(serde_json::json!({
            "job-id": job, "device": node, "base-node": top, "auto-dismiss": false,
        })),
    )?;
    finish_commit_back(q, node, &job)
}

/// Waits for the bench's merge job `job` of `node`, then removes the node — which only
/// succeeds once the hypervisor switched back (the node is then used by nothing).
fn finish_commit_back(q: &mut Qmp, node: &str, job: &str) -> Result<()> {
    let done = q.finish_job(job, |_, _| {})?;
    q.dismiss_job(job)?;
    if let Some(e) = done.error {
        return Err(Error::backend(
            "bench",
            format!("merge job {job} failed: {e}"),
        ));
    }
    q.delete_node(node)
}

/// Undoes a bench overlay a crash left (see [`bench`]): a merge job of it still in the
/// hypervisor is finished; an overlay node still in use (on top of the disk) is merged back;
/// then the file and the intent go. The overlay is never recorded as a snapshot. When the
/// hypervisor is gone and the overlay holds data of its own, kiln cannot tell whether the
/// merge back had finished (the disk's writes since would be overwritten by merging again):
/// the intent stays and the error says so.
fn recover_bench(l: &mut Locked, o: &OnlineSnapshot) -> Result<()> {
    let path = l.path(&o.overlay);
    let active = l.path(&l.chain.active);
    tracing::info!(volume = %l.chain.volume_id, overlay = %path.display(), "undoing an interrupted bench overlay");
    let job = bench_job_id(&o.overlay_node);
    let up = hypervisor::with_monitor(&o.qmp, |m| match m {
        Monitor::Up(q) => {
            if q.jobs()?.iter().any(|j| j.id == job) {
                finish_commit_back(q, &o.overlay_node, &job)?;
                return Ok(true);
            }
            let nodes = q.block_nodes()?;
            if nodes.iter().any(|n| n.node_name == o.overlay_node)
                && q.delete_node(&o.overlay_node).is_err()
            {
                // In use: it is on top of the disk. Merge it back.
                let top = top_node(&nodes, &active, None).ok_or_else(|| {
                    Error::wrong_state(format!(
                        "bench overlay {} is on top of a disk, but no node has {} open",
                        path.display(),
                        active.display()
                    ))
                })?;
                commit_back(q, &o.overlay_node, &top)?;
            }
            Ok(true)
        }
        Monitor::Gone(_) => Ok(false),
    })?;
    if !up && sys::exists(&path)? {
        let held = qemu::is_held(&l.dir, &l.chain.active)?;
        if held || qemu::has_own_clusters(&l.dir, &o.overlay)? {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "volume {}: a bench overlay {} was left by a crash and its hypervisor's \
                     monitor {} is gone; {} — start the hypervisor again so kiln can ask it",
                    l.chain.volume_id,
                    path.display(),
                    o.qmp,
                    if held {
                        "another process still holds the volume's files"
                    } else {
                        "the overlay holds writes and kiln cannot tell whether they were merged back"
                    }
                ),
            ));
        }
    }
    l.chain.online = None;
    l.commit()?;
    sys::remove_if_exists(&path)?;
    Ok(())
}
