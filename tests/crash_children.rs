//! kiln killed (`kill -9`) while its `qemu-img` child merges 512 MiB layers of a qcow2
//! snapshot delete: the child must die with kiln (PR_SET_PDEATHSIG), not keep qemu's image
//! locks and finish behind the next kiln's back; the next kiln command's recovery must then
//! finish or cleanly abandon the delete (never `error_deleting`), the chain record must match
//! the qcow2 headers (`kiln volume check`), and every remaining image must export with
//! the sha256 of the data written.
//!
//! Both merge paths: the commit path (the snapshot's file has one child: `qemu-img commit`)
//! and the rebase path (two children after a revert: `qemu-img rebase -b ""`).
//!
//! The test process makes itself a child subreaper, so the orphaned qemu-img is re-parented
//! to it: waiting for it shows exactly how it ended (killed by SIGKILL, not finished).

mod common;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Kiln, chain_record, s};
use serde_json::Value;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// Volume size, in MiB.
const SIZE_MIB: u64 = 1024;
/// Data written into each layer, in MiB.
const LAYER_MIB: u64 = 512;

use libc::{PR_SET_CHILD_SUBREAPER, SIGKILL, WNOHANG, prctl, waitpid};

/// Makes this process the reaper of its orphaned descendants (the qemu-img kiln leaves).
fn become_subreaper() {
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { prctl(PR_SET_CHILD_SUBREAPER, 1u64, 0u64, 0u64, 0u64) };
    assert_eq!(rc, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
}

/// What each MiB of the image holds: 0 = never written (zeros), else the byte it is filled
/// with. Layers fill different bytes per MiB, so a cluster merged to the wrong place shows.
#[derive(Clone)]
struct Model(Vec<u8>);

impl Model {
    fn new() -> Model {
        Model(vec![0; SIZE_MIB as usize])
    }

    fn byte(layer: u8, mib: u64) -> u8 {
        ((u64::from(layer) * 31 + mib * 7) % 251 + 1) as u8
    }

    /// The sha256 of the whole image (streamed, 1 MiB at a time).
    fn sha256(&self) -> String {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; MIB as usize];
        for b in &self.0 {
            buf.fill(*b);
            h.update(&buf);
        }
        hex::encode(h.finalize())
    }
}

/// A qcow2 volume driven through the `kiln` binary, with its model.
struct Vol<'a> {
    k: &'a Kiln,
    id: String,
    vdir: PathBuf,
    img: Model,
}

impl<'a> Vol<'a> {
    fn create(k: &'a Kiln) -> Vol<'a> {
        let v = k.json(&[
            "volume",
            "create",
            "--backend",
            "qcow",
            "--size",
            &format!("{SIZE_MIB}M"),
        ]);
        let id = s(&v, "id");
        let vdir = k.qcow_dir().join(format!("volume-{id}"));
        Vol {
            k,
            id,
            vdir,
            img: Model::new(),
        }
    }

    fn record(&self) -> Value {
        chain_record(&self.vdir)
    }

    /// Writes `LAYER_MIB` MiB of layer `layer`'s data from `start_mib` into the volume's
    /// active file (as a guest would), one `qemu-io` with a write per MiB.
    fn fill(&mut self, layer: u8, start_mib: u64) {
        let active = self.vdir.join(self.record()["active"].as_str().unwrap());
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for m in start_mib..start_mib + LAYER_MIB {
            let b = Model::byte(layer, m);
            cmd.arg("-c")
                .arg(format!("write -q -P {b} {} {MIB}", m * MIB));
            self.img.0[m as usize] = b;
        }
        let out = cmd.arg(&active).output().unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "qemu-io: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn snap(&self) -> (String, Model) {
        let sid = s(&self.k.json(&["snapshot", "create", &self.id]), "id");
        (sid, self.img.clone())
    }
}

/// Exports snapshot `sid` and returns the sha256 kiln printed, after checking it against
/// the exported file itself.
fn export(k: &Kiln, sid: &str) -> String {
    let out = k.dir.path().join(format!("export-{sid}.raw"));
    let e = k.json(&["snapshot", "export", sid, "--output", out.to_str().unwrap()]);
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(&out).unwrap();
    std::io::copy(&mut f, &mut HashWriter(&mut h)).unwrap();
    let printed = s(&e, "sha256");
    assert_eq!(printed, hex::encode(h.finalize()), "export of {sid}");
    std::fs::remove_file(&out).unwrap();
    printed
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One process seen in /proc: (pid, parent pid, command name, start time).
fn stat(pid: i32) -> Option<(i32, String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After the command: state, ppid, ... starttime is field 22 overall (index 19 here).
    let ppid = rest.get(1)?.parse().ok()?;
    let start = rest.get(19)?.parse().ok()?;
    Some((ppid, comm, start))
}

fn argv(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes `pid` has written so far (`wchar` in /proc/<pid>/io).
fn written(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("wchar: ").and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Waits until `kiln` has a `qemu-img <sub>` child that has written at least 32 MiB (so the
/// kill lands in the middle of the merge), and returns its pid.
fn qemu_img_child_at_work(kiln: &mut Child, sub: &str) -> i32 {
    let parent = kiln.id() as i32;
    let started = Instant::now();
    loop {
        if let Some(st) = kiln.try_wait().unwrap() {
            panic!("kiln exited ({st}) before a qemu-img {sub} child was seen at work");
        }
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Some((ppid, comm, _)) = stat(pid) else {
                continue;
            };
            if ppid == parent
                && comm == "qemu-img"
                && argv(pid).get(1).map(String::as_str) == Some(sub)
                && written(pid) >= 32 * MIB
            {
                return pid;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no qemu-img {sub} child of kiln at work"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How the test stops kiln mid-delete.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// `kill -9`, or the OOM killer.
    Kill,
    /// Ctrl-C (SIGINT): kiln must stop at once, as a crash would, and never release its
    /// locks while its child still works.
    Interrupt,
}

/// Starts `kiln snapshot delete <sid>`, stops it (`how`) while its qemu-img `sub` child
/// works, and asserts the child died of SIGKILL too.
fn kill_kiln_during(k: &Kiln, sid: &str, sub: &str) {
    stop_kiln_during(k, sid, sub, Stop::Kill)
}

fn stop_kiln_during(k: &Kiln, sid: &str, sub: &str, how: Stop) {
    become_subreaper();
    let mut kiln = k
        .cmd(&["snapshot", "delete", sid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let qpid = qemu_img_child_at_work(&mut kiln, sub);
    let (_, _, started) = stat(qpid).unwrap();
    match how {
        Stop::Kill => {
            kiln.kill().unwrap();
            let st = kiln.wait().unwrap();
            assert_eq!(st.signal(), Some(SIGKILL), "kiln: {st}");
        }
        Stop::Interrupt => {
            // SAFETY: plain syscall on a child we started.
            assert_eq!(unsafe { libc::kill(kiln.id() as i32, libc::SIGINT) }, 0);
            // kiln exits at once with 130 rather than waiting for qemu-img: bounded, so a
            // kiln that waits for its child fails here instead of hanging.
            let asked = Instant::now();
            let st = loop {
                if let Some(st) = kiln.try_wait().unwrap() {
                    break st;
                }
                assert!(
                    asked.elapsed() < Duration::from_secs(30),
                    "kiln did not stop on SIGINT"
                );
                std::thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(st.code(), Some(130), "kiln: {st}");
        }
    }
    // The orphan is now this process's child: wait for it and see how it ended. Bounded
    // so that a qemu-img that survives makes the test fail rather than hang.
    let waited = Instant::now();
    let status = loop {
        let mut status = 0;
        // SAFETY: plain syscall writing into a local.
        let rc = unsafe { waitpid(qpid, &mut status, WNOHANG) };
        if rc == qpid {
            break status;
        }
        assert_eq!(
            rc, 0,
            "waitpid({qpid}) failed: not re-parented to the test?"
        );
        assert!(
            stat(qpid).is_some_and(|(_, _, s)| s == started),
            "qemu-img {qpid} vanished without being reaped"
        );
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "qemu-img {sub} ({qpid}) still running after kiln was killed: {:?}",
            argv(qpid)
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // WIFSIGNALED and WTERMSIG, spelled out: the low 7 bits hold the signal.
    assert_eq!(
        status & 0x7f,
        SIGKILL,
        "qemu-img {sub} was not killed with kiln (wait status {status:#x})"
    );
}

/// After recovery: the deleted snapshot is gone (or back to `available`, never
/// `error_deleting`), the record matches the headers, and every remaining snapshot and the
/// volume export with the model's sha256.
fn check_after_recovery(k: &Kiln, vol: &Vol, deleted: &str, remaining: &[(String, Model)]) {
    // The next kiln command runs recovery first.
    let snaps = k.json(&["snapshot", "list", "--volume", &vol.id]);
    let snaps = snaps.as_array().unwrap();
    match snaps.iter().find(|x| x["id"] == deleted) {
        None => eprintln!("snapshot {deleted} is gone"),
        Some(x) => assert_eq!(x["status"], "available", "after recovery: {x}"),
    }
    for x in snaps {
        assert_eq!(x["status"], "available", "after recovery: {x}");
    }
    let shown = k.json(&["volume", "show", &vol.id]);
    assert_eq!(shown["status"], "available", "{shown}");
    // The record against every qcow2 header: the driver's volume check, through the CLI.
    let report = k.json(&["volume", "check", &vol.id]);
    assert_eq!(report["consistent"], true, "{report}");
    assert!(
        report["findings"].as_array().unwrap().is_empty(),
        "{report}"
    );
    for (sid, model) in remaining {
        assert_eq!(export(k, sid), model.sha256(), "snapshot {sid}");
    }
    // The volume itself, through a new snapshot of it.
    let now = s(&k.json(&["snapshot", "create", &vol.id]), "id");
    assert_eq!(export(k, &now), vol.img.sha256(), "volume");
    k.json(&["snapshot", "delete", &now]);
}

/// Deletes snapshot `sid` unless recovery already did.
fn delete_if_listed(k: &Kiln, vol: &Vol, sid: &str) {
    let snaps = k.json(&["snapshot", "list", "--volume", &vol.id]);
    if snaps.as_array().unwrap().iter().any(|x| x["id"] == sid) {
        k.json(&["snapshot", "delete", sid]);
    }
}

/// Commit path: the newest snapshot's file has one child, the active file holding 512 MiB:
/// `qemu-img commit` writes them into the snapshot's file.
#[test]
fn kill_during_qcow2_commit_kills_the_child_and_recovers() {
    let k = Kiln::new();
    let mut vol = Vol::create(&k);
    vol.fill(1, 0);
    let s1 = vol.snap();
    vol.fill(2, LAYER_MIB / 2);
    let s2 = vol.snap();
    vol.fill(3, SIZE_MIB - LAYER_MIB);
    let f2 = vol.record()["snapshots"][&s2.0]["file"]
        .as_str()
        .unwrap()
        .to_string();
    let children: Vec<String> = vol.record()["files"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, l)| l["backing"] == f2.as_str())
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(children.len(), 1, "the commit path needs one child");

    kill_kiln_during(&k, &s2.0, "commit");
    check_after_recovery(&k, &vol, &s2.0, std::slice::from_ref(&s1));
    // Whatever recovery did, the snapshot can be deleted now and the rest stays intact.
    delete_if_listed(&k, &vol, &s2.0);
    check_after_recovery(&k, &vol, &s2.0, &[s1]);
}

/// Rebase path: the first snapshot's file has two children after a revert (the second
/// snapshot's file and the active file), 512 MiB in each layer: the delete rebases each
/// child onto nothing (`qemu-img rebase -b ""`, copying the base's data into it).
#[test]
fn kill_during_qcow2_rebase_kills_the_child_and_recovers() {
    let k = Kiln::new();
    let mut vol = Vol::create(&k);
    vol.fill(1, 0);
    let s1 = vol.snap();
    vol.fill(2, LAYER_MIB / 2);
    let s2 = vol.snap();
    k.json(&["snapshot", "revert", &s1.0]);
    vol.img = s1.1.clone();
    vol.fill(3, SIZE_MIB - LAYER_MIB);
    let f1 = vol.record()["snapshots"][&s1.0]["file"]
        .as_str()
        .unwrap()
        .to_string();
    let children = vol.record()["files"]
        .as_object()
        .unwrap()
        .values()
        .filter(|l| l["backing"] == f1.as_str())
        .count();
    assert_eq!(children, 2, "the rebase path needs two children");

    kill_kiln_during(&k, &s1.0, "rebase");
    check_after_recovery(&k, &vol, &s1.0, std::slice::from_ref(&s2));
    delete_if_listed(&k, &vol, &s1.0);
    check_after_recovery(&k, &vol, &s1.0, &[s2]);
}

/// Ctrl-C during the commit: kiln exits at once (130); its qemu-img child dies with it, so
/// no lock is released while the child still writes; the next command recovers.
#[test]
fn ctrl_c_during_qcow2_commit_stops_kiln_and_its_child_and_recovers() {
    let k = Kiln::new();
    let mut vol = Vol::create(&k);
    vol.fill(1, 0);
    let s1 = vol.snap();
    vol.fill(2, LAYER_MIB / 2);
    let s2 = vol.snap();
    vol.fill(3, SIZE_MIB - LAYER_MIB);
    stop_kiln_during(&k, &s2.0, "commit", Stop::Interrupt);
    check_after_recovery(&k, &vol, &s2.0, std::slice::from_ref(&s1));
    delete_if_listed(&k, &vol, &s2.0);
    check_after_recovery(&k, &vol, &s2.0, &[s1]);
}
