//! qcow2 snapshot deletes that merge by commit (the snapshot's file has exactly one child):
//! the newest snapshot, a middle one whose child is a later snapshot's file with its own
//! child, and a base; after each delete every remaining snapshot and the volume read back
//! byte for byte, and the record agrees with the qcow2 headers. Each crash point of the
//! commit path is reproduced on disk and must be finished by the next operation; a delete a
//! crash left half-done is never abandoned (its snapshot's image may already be rewritten),
//! not even while a hypervisor holds the chain open.

mod common;

use std::path::{Path, PathBuf};

use common::{Env, MIB, Vol, check_snapshot, listing};
use kiln_core::{Snapshot, VolumeDriver};

const SIZE: u64 = 32 * MIB;

fn record(vdir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(vdir.join("chain.json")).unwrap()).unwrap()
}

fn file_of(vdir: &Path, s: &Snapshot) -> String {
    record(vdir)["snapshots"][s.id.to_string()]["file"]
        .as_str()
        .unwrap()
        .to_string()
}

fn backing_in_header(vdir: &Path, file: &str) -> Option<String> {
    let info = duct::cmd!("qemu-img", "info", "-U", "--output=json", file)
        .dir(vdir)
        .read()
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    info["backing-filename"].as_str().map(str::to_string)
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
        assert!(
            e.get("deleting").is_none(),
            "{id}: delete intent left behind"
        );
        assert!(e.get("commit_child").is_none(), "{id}: commit_child left");
    }
    let mut want: Vec<String> = files.keys().cloned().collect();
    want.push("chain.json".into());
    want.sort();
    assert_eq!(listing(vdir), want);
}

fn qemu_img(vdir: &Path, args: &[&str]) {
    duct::cmd("qemu-img", args).dir(vdir).run().unwrap();
}

fn qemu_io(image: &Path, cmd: &str) {
    let out = duct::cmd!("qemu-io", "-f", "qcow2", "-c", cmd, image)
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked()
        .run()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmd}: {text}"
    );
}

/// Zeroes a range of the active file with qcow2 zero clusters (`write -z`): the commit must
/// carry zero clusters down too, or the data under them would show through.
async fn zero(env: &Env, vol: &mut Vol, off: u64, len: u64) {
    let img = env.driver.active_image(&vol.v).unwrap();
    qemu_io(&img, &format!("write -z {off} {len}"));
    vol.img[off as usize..(off + len) as usize].fill(0);
}

/// A volume with three snapshots in one line, each layer holding its own data (including
/// partial clusters and zeroed ranges over older data), and data in the active file.
struct Line {
    vol: Vol,
    vdir: PathBuf,
    snaps: Vec<(Snapshot, Vec<u8>)>,
}

async fn line(env: &Env) -> Line {
    let mut vol = Vol::create(env, SIZE).await;
    let vdir = env.driver.path().join(format!("volume-{}", vol.v.id));
    vol.scatter(env, 1).await;
    let s1 = vol.snap(env).await;
    vol.scatter(env, 2).await;
    zero(env, &mut vol, 17 * MIB, 256 * 1024).await;
    let s2 = vol.snap(env).await;
    vol.write(env, 5 * MIB, 4096, 3).await;
    vol.write(env, 9 * MIB + 100, 200_000, 4).await;
    zero(env, &mut vol, 0, 64 * 1024).await;
    let s3 = vol.snap(env).await;
    vol.write(env, 17 * MIB + 8192, 4096, 5).await;
    vol.write(env, 30 * MIB, 70_000, 6).await;
    Line {
        vol,
        vdir,
        snaps: vec![s1, s2, s3],
    }
}

impl Line {
    async fn check(&self, env: &Env, gone: &[usize]) {
        for (i, (s, want)) in self.snaps.iter().enumerate() {
            if gone.contains(&i) {
                assert!(
                    env.driver.lookup_snapshot(s).await.unwrap().is_none(),
                    "s{}",
                    i + 1
                );
            } else {
                check_snapshot(&env.driver, s, want).await;
            }
        }
        self.vol.check(env).await;
        assert_consistent(&self.vdir);
    }
}

/// Newest, then middle (child is a snapshot's file with its own child), then the base, then
/// the last one: every delete here takes the commit path, and the volume's active file and
/// the surviving snapshots' files keep their names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_deletes_keep_every_image() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let mut l = line(&env).await;
    let active = d.active_image(&l.vol.v).unwrap();
    let f: Vec<String> = l.snaps.iter().map(|(s, _)| file_of(&l.vdir, s)).collect();

    // Newest: its only child is the active file, committed into s3's file, which then
    // takes the active file's name.
    d.delete_snapshot(&l.snaps[2].0).await.unwrap();
    assert!(!l.vdir.join(&f[2]).exists());
    assert_eq!(d.active_image(&l.vol.v).unwrap(), active);
    assert_eq!(
        backing_in_header(&l.vdir, active.file_name().unwrap().to_str().unwrap()),
        Some(f[1].clone())
    );
    l.check(&env, &[2]).await;

    // More data and a new newest snapshot, so s2's file's child is s4's file (a snapshot
    // image) which has the active file as its child.
    l.vol.write(&env, 2 * MIB, 8192, 7).await;
    let s4 = l.vol.snap(&env).await;
    let f4 = file_of(&l.vdir, &s4.0);
    let active = d.active_image(&l.vol.v).unwrap();
    l.vol.write(&env, 3 * MIB, 4096, 8).await;
    l.snaps.push(s4);
    d.delete_snapshot(&l.snaps[1].0).await.unwrap();
    assert!(!l.vdir.join(&f[1]).exists());
    // s4 keeps its file name (its provider_location stays true), now backed by s1's file.
    assert_eq!(file_of(&l.vdir, &l.snaps[3].0), f4);
    assert_eq!(backing_in_header(&l.vdir, &f4), Some(f[0].clone()));
    l.check(&env, &[1, 2]).await;

    // The base: its only child (s4's file) becomes the base.
    d.delete_snapshot(&l.snaps[0].0).await.unwrap();
    assert_eq!(backing_in_header(&l.vdir, &f4), None);
    l.check(&env, &[0, 1, 2]).await;

    // The last one: the volume is a single file again, under the active file's name.
    d.delete_snapshot(&l.snaps[3].0).await.unwrap();
    assert_eq!(d.active_image(&l.vol.v).unwrap(), active);
    l.check(&env, &[0, 1, 2, 3]).await;
    assert_eq!(listing(&l.vdir).len(), 2);
    // Deleting again is a no-op; the volume keeps working.
    d.delete_snapshot(&l.snaps[3].0).await.unwrap();
    l.vol.write(&env, 0, 4096, 9).await;
    let s5 = l.vol.snap(&env).await;
    check_snapshot(d, &s5.0, &s5.1).await;
    l.vol.check(&env).await;
}

/// Writes the intent of a commit-path delete of `s` (file `F`, child `C`) into the record,
/// as the delete commits it before touching any file. Returns (F, C).
fn record_intent(vdir: &Path, s: &Snapshot) -> (String, String) {
    let mut chain = record(vdir);
    let f = file_of(vdir, s);
    let children: Vec<String> = chain["files"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, l)| l["backing"].as_str() == Some(f.as_str()))
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(children.len(), 1, "{children:?}");
    let e = &mut chain["snapshots"][s.id.to_string()];
    e["deleting"] = serde_json::json!(true);
    e["commit_child"] = serde_json::json!(children[0]);
    std::fs::write(vdir.join("chain.json"), serde_json::to_vec(&chain).unwrap()).unwrap();
    (f, children[0].clone())
}

/// Garbage under clusters the child allocates: what an interrupted commit may have left in
/// the snapshot's file (any content there is hidden by the child). The ranges are ones
/// `line` wrote after s2, so s3's file allocates their clusters.
fn scribble_under_child(vdir: &Path, f: &str) {
    let img = vdir.join(f);
    qemu_io(&img, "write -P 0xee 5242880 4096");
    qemu_io(&img, &format!("write -P 0xee {} 65536", 9 * MIB + 65536));
}

/// Every crash point of the commit path, reproduced on disk, is finished by the next
/// operation (a delete re-run, or an unrelated read), with every image intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_commit_deletes_are_finished() {
    let env = Env::qcow2().await;
    let d = &env.driver;

    // 1. Intent committed, nothing else: the re-run of the delete does it all.
    let l = line(&env).await;
    let (f, _) = record_intent(&l.vdir, &l.snaps[1].0);
    assert!(d.lookup_snapshot(&l.snaps[1].0).await.unwrap().is_some());
    d.delete_snapshot(&l.snaps[1].0).await.unwrap();
    assert!(!l.vdir.join(&f).exists());
    l.check(&env, &[1]).await;

    // 2. Commit interrupted midway (garbage under the child's clusters): an unrelated
    //    operation (a read of s3, the child) finishes the delete first.
    let l = line(&env).await;
    let (f, c) = record_intent(&l.vdir, &l.snaps[1].0);
    scribble_under_child(&l.vdir, &f);
    check_snapshot(d, &l.snaps[2].0, &l.snaps[2].1).await;
    assert!(!l.vdir.join(&f).exists());
    assert_eq!(
        backing_in_header(&l.vdir, &c),
        Some(file_of(&l.vdir, &l.snaps[0].0))
    );
    l.check(&env, &[1]).await;

    // 3. Commit complete, not yet renamed: a snapshot of the volume finishes it first.
    let mut l = line(&env).await;
    let (f, c) = record_intent(&l.vdir, &l.snaps[2].0);
    qemu_img(
        &l.vdir,
        &["commit", "-q", "-f", "qcow2", "-d", "-b", &f, &c],
    );
    l.vol.write(&env, 12 * MIB, 4096, 10).await;
    let s4 = l.vol.snap(&env).await;
    l.snaps.push(s4);
    assert!(!l.vdir.join(&f).exists());
    l.check(&env, &[2]).await;

    // 4. Renamed over the child, record not yet updated: only the record is left to do.
    let l = line(&env).await;
    let (f, c) = record_intent(&l.vdir, &l.snaps[1].0);
    qemu_img(
        &l.vdir,
        &["commit", "-q", "-f", "qcow2", "-d", "-b", &f, &c],
    );
    std::fs::rename(l.vdir.join(&f), l.vdir.join(&c)).unwrap();
    d.delete_snapshot(&l.snaps[1].0).await.unwrap();
    l.check(&env, &[1]).await;

    // 5. The same for a base (no parent): committed and renamed, the child is standalone.
    let l = line(&env).await;
    let (f, c) = record_intent(&l.vdir, &l.snaps[0].0);
    qemu_img(
        &l.vdir,
        &["commit", "-q", "-f", "qcow2", "-d", "-b", &f, &c],
    );
    std::fs::rename(l.vdir.join(&f), l.vdir.join(&c)).unwrap();
    check_snapshot(d, &l.snaps[1].0, &l.snaps[1].1).await;
    assert_eq!(backing_in_header(&l.vdir, &c), None);
    l.check(&env, &[0]).await;

    // 6. A record that says the rename happened when it did not (the file is missing and the
    //    child is still backed by it) is refused, not "finished" into a broken chain.
    let l = line(&env).await;
    let (f, _) = record_intent(&l.vdir, &l.snaps[1].0);
    let saved = l.vdir.join(".saved");
    std::fs::rename(l.vdir.join(&f), &saved).unwrap();
    let e = d.delete_snapshot(&l.snaps[1].0).await.unwrap_err();
    assert!(e.to_string().contains("inconsistent"), "{e}");
    std::fs::rename(&saved, l.vdir.join(&f)).unwrap();
    d.delete_snapshot(&l.snaps[1].0).await.unwrap();
    l.check(&env, &[1]).await;
}

/// A process holding the active qcow2 file open for writing, as a hypervisor does.
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

/// With the chain held open: a fresh commit-path delete is refused by qemu's image locks
/// before anything is written and abandoned cleanly (the snapshot stays, readable); but a
/// delete a crash interrupted mid-commit (its snapshot's image already rewritten) is never
/// abandoned: operations on the volume fail until the holder lets go, then the delete is
/// finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_chain_refuses_fresh_and_keeps_interrupted_commit_deletes() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let l = line(&env).await;
    let active = d.active_image(&l.vol.v).unwrap();
    {
        let _held = Holder::open(&active);
        for (s, _) in &l.snaps {
            // qemu's lock refusal: another process holds the chain, retry later.
            let e = d.delete_snapshot(s).await.unwrap_err();
            assert_eq!(e.kind(), kiln_core::ErrorKind::Unavailable, "{e}");
            assert_consistent(&l.vdir);
        }
        for (s, want) in &l.snaps {
            check_snapshot(d, s, want).await;
        }
    }
    l.check(&env, &[]).await;

    let (f, _) = record_intent(&l.vdir, &l.snaps[1].0);
    scribble_under_child(&l.vdir, &f);
    {
        let _held = Holder::open(&active);
        let e = d.delete_snapshot(&l.snaps[1].0).await.unwrap_err();
        assert_eq!(e.kind(), kiln_core::ErrorKind::Unavailable, "{e}");
        // Still pending: s2's image may be garbage, so it must not come back as a snapshot.
        assert_eq!(
            record(&l.vdir)["snapshots"][l.snaps[1].0.id.to_string()]["deleting"],
            serde_json::json!(true)
        );
        assert!(d.open_snapshot_reader(&l.snaps[0].0).await.is_err());
    }
    check_snapshot(d, &l.snaps[0].0, &l.snaps[0].1).await;
    l.check(&env, &[1]).await;
}
