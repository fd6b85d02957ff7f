//! The qcow2 record against the qcow2 headers, with the real qemu-img:
//! - the volume check (`VolumeCheck`) finds each kind of inconsistency (missing, extra,
//!   temp and unknown files, wrong backing file, wrong format, wrong size, pending deletes),
//!   changes nothing without `repair`, and with it repairs only what cannot lose data;
//! - the wedge found in review: a `qemu-img rebase -b ""` that outlived its kiln finished
//!   after the next kiln recorded the child as still backed; check finds it, repair fixes
//!   it, and later deletes work (also without the check: deletes read the headers first);
//! - interrupted deletes resumed against headers that disagree with the record: the step the
//!   header proves is finished, anything else is refused naming the file;
//! - a delete refused by qemu's image lock is `Unavailable`.

mod common;

use std::path::{Path, PathBuf};

use common::{Env, MIB, Vol, check_snapshot, listing};
use kiln_core::{
    CheckReport, DeleteAction, ErrorKind, Snapshot, Volume, VolumeDriver, no_progress,
};
use kiln_driver_file::FileDriver;

const SIZE: u64 = 32 * MIB;

fn record(vdir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(vdir.join("chain.json")).unwrap()).unwrap()
}

fn write_record(vdir: &Path, chain: &serde_json::Value) {
    std::fs::write(vdir.join("chain.json"), serde_json::to_vec(chain).unwrap()).unwrap();
}

fn file_of(vdir: &Path, s: &Snapshot) -> String {
    record(vdir)["snapshots"][s.id.to_string()]["file"]
        .as_str()
        .unwrap()
        .to_string()
}

fn backing_in_record(vdir: &Path, file: &str) -> Option<String> {
    record(vdir)["files"][file]["backing"]
        .as_str()
        .map(str::to_string)
}

fn backing_in_header(vdir: &Path, file: &str) -> Option<String> {
    let info = duct::cmd!("qemu-img", "info", "-U", "--output=json", file)
        .dir(vdir)
        .read()
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    info["backing-filename"].as_str().map(str::to_string)
}

fn qemu_img(vdir: &Path, args: &[&str]) {
    duct::cmd("qemu-img", args).dir(vdir).run().unwrap();
}

/// The record says what the headers say, no intent is pending, and the directory holds
/// exactly the record and the files it names.
fn assert_consistent(vdir: &Path) {
    let chain = record(vdir);
    let files = chain["files"].as_object().unwrap();
    for (name, layer) in files {
        assert_eq!(
            backing_in_header(vdir, name).as_deref(),
            layer["backing"].as_str(),
            "{name}: header and record disagree"
        );
    }
    for (id, e) in chain["snapshots"].as_object().unwrap() {
        assert!(e.get("deleting").is_none(), "{id}: delete intent left");
    }
    let mut want: Vec<String> = files.keys().cloned().collect();
    want.push("chain.json".into());
    want.sort();
    assert_eq!(listing(vdir), want);
}

async fn check(d: &FileDriver, v: &Volume, repair: bool) -> CheckReport {
    let c = d.check().expect("the file backend has a volume check");
    let v = v.clone();
    tokio::task::spawn_blocking(move || c.check_volume(&v, repair))
        .await
        .unwrap()
        .unwrap()
}

/// Everything a check without repair must leave alone: names, sizes, contents' checksums
/// and modification times of every file in the volume directory.
fn fingerprint(vdir: &Path) -> Vec<(String, u64, std::time::SystemTime, Vec<u8>)> {
    use sha2_free::digest;
    listing(vdir)
        .into_iter()
        .map(|n| {
            let p = vdir.join(&n);
            let m = std::fs::metadata(&p).unwrap();
            (
                n,
                m.len(),
                m.modified().unwrap(),
                digest(&std::fs::read(&p).unwrap()),
            )
        })
        .collect()
}

/// A cheap content digest (no hashing crate in this crate's dev-dependencies): FNV-1a over
/// 8-byte words plus the length, enough to see that a file was not rewritten.
mod sha2_free {
    pub fn digest(b: &[u8]) -> Vec<u8> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for c in b.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0100_0000_01b3);
        }
        [h.to_le_bytes(), (b.len() as u64).to_le_bytes()].concat()
    }
}

/// A volume whose first snapshot's file `F0` has two children after a revert: `A1` (the
/// second snapshot's file) and the active file. Data in every layer.
struct Branches {
    vol: Vol,
    vdir: PathBuf,
    s1: (Snapshot, Vec<u8>),
    s2: (Snapshot, Vec<u8>),
}

async fn branches(env: &Env) -> Branches {
    let d = &env.driver;
    let mut vol = Vol::create(env, SIZE).await;
    let vdir = d.path().join(format!("volume-{}", vol.v.id));
    vol.scatter(env, 1).await;
    // Data only the first snapshot's file holds (no later layer overwrites it).
    vol.write(env, 25 * MIB, 8192, 10).await;
    let s1 = vol.snap(env).await;
    vol.scatter(env, 2).await;
    let s2 = vol.snap(env).await;
    vol.write(env, 3 * MIB, 4096, 3).await;
    d.revert_to_snapshot(&vol.v, &s1.0, no_progress())
        .await
        .unwrap();
    vol.img = s1.1.clone();
    vol.write(env, 9 * MIB + 100, 200_000, 4).await;
    let b = Branches { vol, vdir, s1, s2 };
    let f0 = file_of(&b.vdir, &b.s1.0);
    let a1 = file_of(&b.vdir, &b.s2.0);
    assert_eq!(backing_in_record(&b.vdir, &a1), Some(f0.clone()));
    let active = d.active_image(&b.vol.v).unwrap();
    let active = active.file_name().unwrap().to_str().unwrap();
    assert_eq!(backing_in_record(&b.vdir, active), Some(f0));
    b
}

impl Branches {
    async fn check_data(&self, env: &Env) {
        check_snapshot(&env.driver, &self.s1.0, &self.s1.1).await;
        check_snapshot(&env.driver, &self.s2.0, &self.s2.1).await;
        self.vol.check(env).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_a_healthy_volume_finds_nothing_and_repairs_nothing() {
    let env = Env::qcow2().await;
    let b = branches(&env).await;
    let before = fingerprint(&b.vdir);
    for repair in [false, true] {
        let r = check(&env.driver, &b.vol.v, repair).await;
        assert_eq!(
            r,
            CheckReport {
                findings: vec![],
                repaired: vec![],
                consistent: true
            }
        );
    }
    assert_eq!(fingerprint(&b.vdir), before);
    // Raw mode: the volume file exists; a stale temp file of an interrupted snapshot of it
    // is found, and removed by repair.
    let raw = Env::raw().await;
    let v = Vol::create(&raw, 8 * MIB).await;
    let r = check(&raw.driver, &v.v, false).await;
    assert!(r.consistent && r.findings.is_empty(), "{r:?}");
    let tmp = raw
        .driver
        .path()
        .join(format!(".volume-{}.revert.tmp", v.v.id));
    std::fs::write(&tmp, b"half a revert").unwrap();
    let r = check(&raw.driver, &v.v, false).await;
    assert!(!r.consistent && r.findings.len() == 1, "{r:?}");
    assert!(r.findings[0].contains("stray temp file"), "{r:?}");
    assert!(tmp.exists(), "a check without repair removed something");
    let r = check(&raw.driver, &v.v, true).await;
    assert!(r.consistent && r.repaired.len() == 1, "{r:?}");
    assert!(!tmp.exists());
    std::fs::remove_file(raw.driver.active_image(&v.v).unwrap()).unwrap();
    let r = check(&raw.driver, &v.v, true).await;
    assert!(!r.consistent, "{r:?}");
    assert!(r.findings[0].contains("missing file"), "{r:?}");
}

/// The wedge found in review, reproduced exactly: the delete of the first snapshot (two
/// children: rebase path) was killed while `qemu-img rebase -b ""` of `A1` ran; the child
/// survived, the next kiln's recovery met its image lock and abandoned the delete, recording
/// `A1` as still backed by `F0`; then the surviving rebase finished. Done here by running
/// that same safe rebase behind the record's back. After a revert to the second snapshot
/// drops the other branch, the record says `F0` has exactly one child, `A1`: the commit
/// path, whose `qemu-img commit -b F0 A1` fails ("Did not find … in the backing chain") and
/// kept the volume's operations failing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wedge_after_an_orphaned_rebase_is_found_repaired_and_deletes_work() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let mut b = branches(&env).await;
    let (f0, a1) = (file_of(&b.vdir, &b.s1.0), file_of(&b.vdir, &b.s2.0));
    qemu_img(&b.vdir, &["rebase", "-q", "-f", "qcow2", "-b", "", &a1]);
    assert_eq!(backing_in_header(&b.vdir, &a1), None);

    // The check finds exactly that, and without repair changes nothing.
    let before = fingerprint(&b.vdir);
    let r = check(d, &b.vol.v, false).await;
    assert!(!r.consistent && r.repaired.is_empty(), "{r:?}");
    assert_eq!(r.findings.len(), 1, "{r:?}");
    assert!(
        r.findings[0].contains("wrong backing file")
            && r.findings[0].contains(&a1)
            && r.findings[0].contains(&f0),
        "{r:?}"
    );
    assert_eq!(fingerprint(&b.vdir), before);

    // Repair records what the header proves.
    let r = check(d, &b.vol.v, true).await;
    assert!(r.consistent, "{r:?}");
    assert_eq!(r.repaired.len(), 1, "{r:?}");
    assert!(r.repaired[0].contains(&a1), "{r:?}");
    assert_eq!(backing_in_record(&b.vdir, &a1), None);
    assert_consistent(&b.vdir);
    b.check_data(&env).await;

    // The state that wedged: the other branch gone, F0 with (by the old record) one child.
    d.revert_to_snapshot(&b.vol.v, &b.s2.0, no_progress())
        .await
        .unwrap();
    b.vol.img = b.s2.1.clone();
    b.vol.write(&env, 20 * MIB, 4096, 5).await;
    assert_eq!(
        d.delete_snapshot(&b.s1.0).await.unwrap(),
        DeleteAction::Deleted
    );
    assert!(!b.vdir.join(&f0).exists());
    assert_consistent(&b.vdir);
    check_snapshot(d, &b.s2.0, &b.s2.1).await;
    b.vol.check(&env).await;
    assert_eq!(
        d.delete_snapshot(&b.s2.0).await.unwrap(),
        DeleteAction::Deleted
    );
    assert_consistent(&b.vdir);
    b.vol.check(&env).await;
    let r = check(d, &b.vol.v, false).await;
    assert!(r.consistent && r.findings.is_empty(), "{r:?}");
}

/// The same wedge without anyone running the check: the delete reads the children's
/// headers before it picks its path, records the rebase the header proves, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_reads_the_headers_before_choosing_its_path() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let mut b = branches(&env).await;
    let (f0, a1) = (file_of(&b.vdir, &b.s1.0), file_of(&b.vdir, &b.s2.0));
    qemu_img(&b.vdir, &["rebase", "-q", "-f", "qcow2", "-b", "", &a1]);
    d.revert_to_snapshot(&b.vol.v, &b.s2.0, no_progress())
        .await
        .unwrap();
    b.vol.img = b.s2.1.clone();
    assert_eq!(backing_in_record(&b.vdir, &a1), Some(f0.clone()));
    assert_eq!(
        d.delete_snapshot(&b.s1.0).await.unwrap(),
        DeleteAction::Deleted
    );
    assert!(!b.vdir.join(&f0).exists());
    assert_consistent(&b.vdir);
    check_snapshot(d, &b.s2.0, &b.s2.1).await;
    b.vol.check(&env).await;

    // With both branches still there (rebase path), the same: the header-proven child is
    // skipped, the other one rebased.
    let mut b = branches(&env).await;
    let a1 = file_of(&b.vdir, &b.s2.0);
    qemu_img(&b.vdir, &["rebase", "-q", "-f", "qcow2", "-b", "", &a1]);
    d.delete_snapshot(&b.s1.0).await.unwrap();
    assert_consistent(&b.vdir);
    check_snapshot(d, &b.s2.0, &b.s2.1).await;
    b.vol.check(&env).await;
    b.vol.write(&env, 0, 4096, 6).await;
    b.vol.check(&env).await;
}

/// The review's suggested simulation, `qemu-img rebase -u -b ""` (pointer only, no data
/// copied: the second snapshot now shows only its own clusters): the check cannot tell it
/// from a finished safe rebase and must not guess data back; it records the header, and the
/// deletes that follow keep every image exactly as it reads now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_rebase_behind_the_record_is_recorded_as_it_reads() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let b = branches(&env).await;
    let a1 = file_of(&b.vdir, &b.s2.0);
    qemu_img(
        &b.vdir,
        &["rebase", "-q", "-u", "-f", "qcow2", "-b", "", &a1],
    );
    let s2_now = read_snapshot(d, &b.s2.0).await;
    assert!(
        s2_now != b.s2.1,
        "an unsafe rebase changes what the file shows"
    );
    let r = check(d, &b.vol.v, true).await;
    assert!(r.consistent && r.repaired.len() == 1, "{r:?}");
    d.delete_snapshot(&b.s1.0).await.unwrap();
    assert_consistent(&b.vdir);
    check_snapshot(d, &b.s2.0, &s2_now).await;
    b.vol.check(&env).await;
}

async fn read_snapshot(d: &FileDriver, s: &Snapshot) -> Vec<u8> {
    let mut r = d.open_snapshot_reader(s).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut out = vec![0u8; r.size() as usize];
        let mut off = 0;
        while off < out.len() {
            let n = r.read_at(off as u64, &mut out[off..]).unwrap();
            assert!(n > 0);
            off += n;
        }
        out
    })
    .await
    .unwrap()
}

/// Each kind of finding the check reports, one volume each, with what repair does and does
/// not do about it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_each_kind_and_repairs_only_what_is_safe() {
    let env = Env::qcow2().await;
    let d = &env.driver;

    // Missing file (a snapshot's image): reported, never "repaired" away.
    let b = branches(&env).await;
    let a1 = file_of(&b.vdir, &b.s2.0);
    let saved = b.vdir.join("..").join(format!("saved-{a1}"));
    std::fs::rename(b.vdir.join(&a1), &saved).unwrap();
    let chain_before = std::fs::read(b.vdir.join("chain.json")).unwrap();
    let r = check(d, &b.vol.v, true).await;
    assert!(!r.consistent && r.repaired.is_empty(), "{r:?}");
    assert!(
        r.findings.iter().any(|f| f.contains("missing file")
            && f.contains(&a1)
            && f.contains(&b.s2.0.id.to_string())),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read(b.vdir.join("chain.json")).unwrap(),
        chain_before
    );
    std::fs::rename(&saved, b.vdir.join(&a1)).unwrap();
    assert!(check(d, &b.vol.v, false).await.consistent);

    // Wrong format: a snapshot's file that is not qcow2 (here: raw bytes). Reported, left
    // byte for byte as it is.
    let f0 = file_of(&b.vdir, &b.s1.0);
    let keep = std::fs::read(b.vdir.join(&f0)).unwrap();
    std::fs::write(b.vdir.join(&f0), vec![0x11u8; 1 << 20]).unwrap();
    let r = check(d, &b.vol.v, true).await;
    assert!(!r.consistent, "{r:?}");
    assert!(
        r.findings
            .iter()
            .any(|f| f.contains("wrong format") && f.contains(&f0) && f.contains("raw")),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read(b.vdir.join(&f0)).unwrap(),
        vec![0x11u8; 1 << 20]
    );
    std::fs::write(b.vdir.join(&f0), keep).unwrap();
    assert!(check(d, &b.vol.v, false).await.consistent);

    // Extra files: an unrecorded layer (an interrupted snapshot's overlay), stray temp
    // files, and a file kiln never makes. Repair removes the first two kinds, keeps the
    // last.
    let stray = format!("layer-{}.qcow2", kiln_core::VolumeId::new());
    qemu_img(&b.vdir, &["create", "-q", "-f", "qcow2", &stray, "1M"]);
    std::fs::write(b.vdir.join(".chain.json.tmp"), b"{ half").unwrap();
    std::fs::write(b.vdir.join(".bench-x.qcow2"), b"bench").unwrap();
    std::fs::write(b.vdir.join("notes.txt"), b"an admin's notes").unwrap();
    let before = fingerprint(&b.vdir);
    let r = check(d, &b.vol.v, false).await;
    assert_eq!(
        fingerprint(&b.vdir),
        before,
        "check without repair changed files"
    );
    assert_eq!(r.findings.len(), 4, "{r:?}");
    for (kind, name) in [
        ("extra file", stray.as_str()),
        ("stray temp file", ".chain.json.tmp"),
        ("stray temp file", ".bench-x.qcow2"),
        ("unexpected file", "notes.txt"),
    ] {
        assert!(
            r.findings
                .iter()
                .any(|f| f.contains(kind) && f.contains(name)),
            "{kind} {name}: {r:?}"
        );
    }
    let r = check(d, &b.vol.v, true).await;
    assert_eq!(r.repaired.len(), 3, "{r:?}");
    assert!(!r.consistent, "the unknown file stays: {r:?}");
    assert!(!b.vdir.join(&stray).exists() && !b.vdir.join(".bench-x.qcow2").exists());
    assert!(b.vdir.join("notes.txt").exists());
    std::fs::remove_file(b.vdir.join("notes.txt")).unwrap();
    assert!(check(d, &b.vol.v, false).await.consistent);
    b.check_data(&env).await;

    // An unrecorded layer that a recorded file's header names (its header was pointed at
    // it behind the record's back): neither removed nor recorded; no operation removes it
    // either.
    let other = format!("layer-{}.qcow2", kiln_core::VolumeId::new());
    qemu_img(
        &b.vdir,
        &["create", "-q", "-f", "qcow2", &other, &SIZE.to_string()],
    );
    qemu_img(
        &b.vdir,
        &[
            "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", &other, &a1,
        ],
    );
    let r = check(d, &b.vol.v, true).await;
    assert!(!r.consistent, "{r:?}");
    assert!(
        r.findings
            .iter()
            .any(|f| f.contains("extra file") && f.contains(&other) && f.contains(&a1)),
        "{r:?}"
    );
    assert!(
        r.findings
            .iter()
            .any(|f| f.contains("wrong backing file") && f.contains(&a1)),
        "{r:?}"
    );
    assert!(
        b.vdir.join(&other).exists(),
        "repair removed a referenced file"
    );
    assert_eq!(backing_in_record(&b.vdir, &a1), Some(f0.clone()));
    // An ordinary operation (its recovery removes unrecorded layers) keeps it too.
    check_snapshot(d, &b.s1.0, &b.s1.1).await;
    assert!(
        b.vdir.join(&other).exists(),
        "recovery removed a referenced file"
    );
    // A delete that would merge into that child refuses, naming it.
    let e = d.delete_snapshot(&b.s1.0).await.unwrap_err();
    assert!(
        e.to_string().contains(&a1) && e.to_string().contains("inconsistent"),
        "{e}"
    );
    assert!(d.lookup_snapshot(&b.s1.0).await.unwrap().is_some());
    // Put the header back: everything is consistent again, the stray layer goes.
    qemu_img(
        &b.vdir,
        &[
            "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", &f0, &a1,
        ],
    );
    let r = check(d, &b.vol.v, true).await;
    assert!(r.consistent, "{r:?}");
    assert!(!b.vdir.join(&other).exists());
    b.check_data(&env).await;

    // Wrong size: the active file grown behind the record's back. Reported only.
    let active = d.active_image(&b.vol.v).unwrap();
    duct::cmd!(
        "qemu-img",
        "resize",
        "-q",
        "-f",
        "qcow2",
        &active,
        (SIZE + MIB).to_string()
    )
    .run()
    .unwrap();
    let r = check(d, &b.vol.v, true).await;
    assert!(!r.consistent && r.repaired.is_empty(), "{r:?}");
    assert!(r.findings.iter().any(|f| f.contains("wrong size")), "{r:?}");

    // A pending delete (the commit path's intent, as a crash leaves it): repair finishes
    // it, exactly as the next operation would.
    let mut l = Vol::create(&env, SIZE).await;
    let vdir = d.path().join(format!("volume-{}", l.v.id));
    l.scatter(&env, 7).await;
    let t1 = l.snap(&env).await;
    l.scatter(&env, 8).await;
    let t2 = l.snap(&env).await;
    l.write(&env, MIB, 4096, 9).await;
    let mut chain = record(&vdir);
    let f = file_of(&vdir, &t1.0);
    let child = file_of(&vdir, &t2.0);
    chain["snapshots"][t1.0.id.to_string()]["deleting"] = serde_json::json!(true);
    chain["snapshots"][t1.0.id.to_string()]["commit_child"] = serde_json::json!(child);
    write_record(&vdir, &chain);
    let r = check(d, &l.v, false).await;
    assert_eq!(r.findings.len(), 1, "{r:?}");
    assert!(r.findings[0].contains("pending delete"), "{r:?}");
    assert_eq!(
        record(&vdir),
        chain,
        "check without repair changed the record"
    );
    let r = check(d, &l.v, true).await;
    assert!(r.consistent, "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("finished")), "{r:?}");
    assert!(!vdir.join(&f).exists());
    assert_consistent(&vdir);
    assert!(d.lookup_snapshot(&t1.0).await.unwrap().is_none());
    check_snapshot(d, &t2.0, &t2.1).await;
    l.check(&env).await;
}

/// Interrupted deletes resumed where a child's header disagrees with the record: the step
/// the header proves already happened is finished; anything else is refused, naming the
/// file, and the images stay intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_deletes_follow_the_headers() {
    let env = Env::qcow2().await;
    let d = &env.driver;

    // Commit path, intent recorded, but the child was rebased onto F's parent (standalone:
    // F is a base) behind the record's back: F is read by nothing any more; the next
    // operation drops it without a commit.
    let mut l = Vol::create(&env, SIZE).await;
    let vdir = d.path().join(format!("volume-{}", l.v.id));
    l.scatter(&env, 1).await;
    let s1 = l.snap(&env).await;
    l.scatter(&env, 2).await;
    let s2 = l.snap(&env).await;
    l.write(&env, 5 * MIB, 8192, 3).await;
    let (f, c) = (file_of(&vdir, &s1.0), file_of(&vdir, &s2.0));
    let mut chain = record(&vdir);
    chain["snapshots"][s1.0.id.to_string()]["deleting"] = serde_json::json!(true);
    chain["snapshots"][s1.0.id.to_string()]["commit_child"] = serde_json::json!(c);
    write_record(&vdir, &chain);
    qemu_img(&vdir, &["rebase", "-q", "-f", "qcow2", "-b", "", &c]);
    check_snapshot(d, &s2.0, &s2.1).await;
    assert!(!vdir.join(&f).exists());
    assert!(d.lookup_snapshot(&s1.0).await.unwrap().is_none());
    assert_consistent(&vdir);
    l.check(&env).await;

    // Rebase path (two children after a revert), intent recorded, one child's header
    // pointed at a third file: refused naming that child; the delete is abandoned with the
    // record kept true (the snapshot stays), and nothing is rewritten.
    let b = branches(&env).await;
    let f0 = file_of(&b.vdir, &b.s1.0);
    let a1 = file_of(&b.vdir, &b.s2.0);
    let mut chain = record(&b.vdir);
    chain["snapshots"][b.s1.0.id.to_string()]["deleting"] = serde_json::json!(true);
    write_record(&b.vdir, &chain);
    let third = format!("layer-{}.qcow2", kiln_core::VolumeId::new());
    qemu_img(
        &b.vdir,
        &["create", "-q", "-f", "qcow2", &third, &SIZE.to_string()],
    );
    qemu_img(
        &b.vdir,
        &[
            "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", &third, &a1,
        ],
    );
    let e = d.delete_snapshot(&b.s1.0).await.unwrap_err();
    assert!(e.to_string().contains(&a1), "{e}");
    assert!(b.vdir.join(&f0).exists() && b.vdir.join(&third).exists());
    assert!(d.lookup_snapshot(&b.s1.0).await.unwrap().is_some());
    qemu_img(
        &b.vdir,
        &[
            "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", &f0, &a1,
        ],
    );
    assert!(check(d, &b.vol.v, true).await.consistent);
    b.check_data(&env).await;
    d.delete_snapshot(&b.s1.0).await.unwrap();
    assert_consistent(&b.vdir);
    check_snapshot(d, &b.s2.0, &b.s2.1).await;
    b.vol.check(&env).await;
}

/// A process holding the active qcow2 file open, as a hypervisor does.
struct Holder(std::process::Child);

impl Holder {
    fn open(image: &Path) -> Holder {
        use std::io::Read;
        let mut child = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(image)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while !String::from_utf8_lossy(&seen).contains("qemu-io>") {
            let n = out.read(&mut buf).unwrap();
            assert!(n > 0, "qemu-io exited: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// qemu's image-lock refusal is "another process holds it: retry later", on both merge
/// paths, and nothing is decided: the snapshots stay, the record stays true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_refusal_is_unavailable_on_both_paths() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let b = branches(&env).await;
    let active = d.active_image(&b.vol.v).unwrap();
    {
        let _held = Holder::open(&active);
        // s1's file has two children, one of them the held active file: rebase path.
        let e = d.delete_snapshot(&b.s1.0).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains("lock"), "{e}");
        assert!(d.lookup_snapshot(&b.s1.0).await.unwrap().is_some());
    }
    assert_consistent(&b.vdir);
    b.check_data(&env).await;
    let mut l = Vol::create(&env, SIZE).await;
    l.scatter(&env, 1).await;
    let s = l.snap(&env).await;
    l.write(&env, 0, 4096, 2).await;
    let vdir = d.path().join(format!("volume-{}", l.v.id));
    {
        let _held = Holder::open(&d.active_image(&l.v).unwrap());
        // One child, the held active file: commit path.
        let e = d.delete_snapshot(&s.0).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    }
    assert_consistent(&vdir);
    check_snapshot(d, &s.0, &s.1).await;
    l.check(&env).await;
    assert_eq!(
        d.delete_snapshot(&s.0).await.unwrap(),
        DeleteAction::Deleted
    );
    l.check(&env).await;
}
