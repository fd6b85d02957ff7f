//! End-to-end tests of the `kiln` binary on real LVM (thin and thick backends).
//!
//! The host kernel has no device-mapper, so this test binary must run as root INSIDE the
//! user-mode-Linux guest that `tests/harness/uml-run.sh` boots: `tests/harness/lvm-suite.sh`
//! builds it on the host and runs it there (one guest boot for the whole file). Anywhere else
//! every test FAILS with instructions.
//!
//! Each test makes a volume group of its own on a loop device over a sparse file in the
//! guest's /tmp, with a thin pool, and a kiln config with two backends on it: `thin`
//! (`type = "thin"`) and `thick` (`type = "thick"`, `thick_snapshot_percent = 100`); the
//! backup test adds `files` (raw files in the data directory) to restore onto. Data
//! reaches the volumes by `pwrite` on the LV's device node (named from `provider_location`),
//! and `lvs` checks what kiln did to the VG. Every external command is an argv vector.

mod common;

use std::path::{Path, PathBuf};

use kiln_testkit::pattern;
use serde_json::{Value, json};

use common::lvm::{TestVg, require_uml_guest};
use common::{
    Runner, assert_bench_timings, assert_same_bytes, backend_row, s, serial, sha256_hex, write_at,
};

const MIB: u64 = 1 << 20;
/// Volume size: small, because thick snapshots reserve COW space of the origin's size and a
/// guest process can keep only about 250 MiB resident under UML (docs/lvm-backend.md), while
/// the lifecycle test keeps several whole expected images.
const SIZE: u64 = 16 * MIB;

// The tests of this file run one at a time (`serial`): they run commands on the same loop
// devices and time-sensitive LVM metadata.

/// A kiln data dir and config with backends `thin` (default) and `thick` on a private VG.
type Kiln = common::Kiln<TestVg>;

impl Kiln {
    fn new() -> Kiln {
        Kiln::with_extra_config("")
    }

    /// [`Kiln::new`] with `extra` appended to the config (more backends).
    fn with_extra_config(extra: &str) -> Kiln {
        require_uml_guest("cli_lvm");
        let dir = tempfile::tempdir().unwrap();
        let vg = TestVg::new("kc", dir.path(), 1024 * MIB, "256m");
        let config = format!("{}{extra}", vg.config());
        common::Kiln::with_config(dir, &config, vg)
            .runner(Runner::Traced)
            .failures_leave_stdout_empty()
    }

    /// The VG's name.
    fn vg(&self) -> &str {
        &self.fixture.vg
    }

    /// Everything an operation could change: both store listings and every LV of the VG.
    fn state(&self) -> (Value, Value, Vec<String>) {
        let (volumes, snapshots) = self.store();
        (volumes, snapshots, self.fixture.lv_state())
    }

    /// `lvs` row of one LV as (attr, size in bytes, origin), or None when it does not exist.
    fn lv(&self, name: &str) -> Option<(String, u64, String)> {
        self.fixture.lv(name)
    }

    /// Names of the LVs kiln made (volumes and snapshots), sorted.
    fn kiln_lvs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .fixture
            .lv_state()
            .iter()
            .map(|l| l.split(' ').next().unwrap().to_string())
            .filter(|n| n.starts_with("volume-") || n.starts_with("_snapshot-"))
            .collect();
        v.sort();
        v
    }

    /// The device node of a volume from its `provider_location` (`vg/lv`), as libdm names it.
    fn dev(&self, v: &Value) -> PathBuf {
        self.fixture.dev(&s(v, "provider_location"))
    }
}

/// An image as the test expects it: zeros with chunks written in order.
#[derive(Clone)]
struct Image(Vec<u8>);

impl Image {
    fn zeros(size: u64) -> Image {
        Image(vec![0; size as usize])
    }

    /// Writes a pattern chunk both to the device (pwrite + fsync) and to this image.
    fn write(&mut self, dev: &Path, off: u64, len: usize, seed: u64) {
        let data = pattern(seed, len);
        write_at(dev, off, &data);
        self.0[off as usize..off as usize + len].copy_from_slice(&data);
    }

    /// Writes `len` zero bytes both to the device (pwrite + fsync) and to this image: a
    /// guest zeroing a range by writing zeros (no discard).
    fn zero(&mut self, dev: &Path, off: u64, len: usize) {
        write_at(dev, off, &vec![0; len]);
        self.0[off as usize..off as usize + len].fill(0);
    }

    fn resized(&self, size: u64) -> Image {
        let mut v = self.0.clone();
        v.resize(size as usize, 0);
        Image(v)
    }

    fn sha256(&self) -> String {
        sha256_hex(&self.0)
    }
}

/// Reads a whole block device.
fn read_dev(dev: &Path) -> Vec<u8> {
    std::fs::read(dev).unwrap_or_else(|e| panic!("read {}: {e}", dev.display()))
}

/// Byte comparison that names the first difference (and its MiB) instead of dumping
/// megabytes.
fn assert_same(got: &[u8], want: &Image, what: &str) {
    assert_same_bytes(got, &want.0, what, ("MiB", MIB));
}

#[test]
fn backend_list_shows_both_lvm_backends_with_capabilities_and_vg_stats() {
    let _g = serial();
    let k = Kiln::new();
    let rows = k.json(&["backend", "list"]);
    assert_eq!(rows.as_array().unwrap().len(), 2, "{rows}");
    for (name, thin) in [("thin", true), ("thick", false)] {
        let b = backend_row(&rows, name);
        assert_eq!(b["driver"], "lvm", "{b}");
        assert_eq!(b["default"], name == "thin", "{b}");
        let c = &b["capabilities"];
        assert_eq!(c["thin"], thin, "{b}");
        assert_eq!(c["clone_cow"], thin, "{b}");
        for cap in ["online_snapshot", "revert_any", "clone"] {
            assert_eq!(c[cap], true, "capability {cap}: {b}");
        }
        assert!(
            s(c, "snapshot_method").contains("lvcreate --snapshot"),
            "{b}"
        );
        assert!(b["stats_error"].is_null(), "{b}");
        let st = &b["stats"];
        let total = st["total_bytes"].as_u64().unwrap();
        let free = st["free_bytes"].as_u64().unwrap();
        // A 1 GiB PV less LVM's metadata area; the pool (and its metadata) is allocated.
        assert!(total > 1000 * MIB && total <= 1024 * MIB, "{b}");
        assert!(free > 0 && free < total - 256 * MIB, "{b}");
        assert_eq!(st["details"]["volume_group"], k.vg(), "{b}");
        assert_eq!(st["details"]["type"], name, "{b}");
        assert_eq!(st["details"]["invalid_snapshots"], json!([]), "{b}");
        if thin {
            assert_eq!(st["details"]["thin_pool"], "pool", "{b}");
            assert_eq!(st["details"]["pool_size_bytes"], 256 * MIB, "{b}");
        }
    }
    let table = k.run(&["backend", "list"]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("thin") && table.contains("thick") && table.contains("lvm"),
        "{table}"
    );
}

/// Every volume and snapshot command on backend `b` ("thin" or "thick"), checked against the
/// store, the bytes on the LV devices and `lvs`.
fn lifecycle(b: &str) {
    let _g = serial();
    let k = Kiln::new();
    let thin = b == "thin";

    // A volume is an LV named from its UUID only; the label never reaches LVM.
    let v = k.json(&[
        "volume",
        "create",
        "--size",
        "16M",
        "--backend",
        b,
        "--name",
        "db disk",
    ]);
    assert_eq!(v["status"], "available");
    assert_eq!(v["size_bytes"], SIZE);
    assert_eq!(v["backend"], b);
    let vid = s(&v, "id");
    let vlv = format!("volume-{vid}");
    assert_eq!(s(&v, "provider_location"), format!("{}/{vlv}", k.vg()));
    let (attr, size, _) = k.lv(&vlv).expect("volume LV missing");
    assert_eq!(size, SIZE);
    assert_eq!(attr.starts_with('V'), thin, "lv_attr {attr}");
    assert_eq!(k.kiln_lvs(), vec![vlv.clone()]);
    assert_eq!(k.json(&["volume", "show", &vid]), v);
    let list = k.json(&["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], vid.as_str());
    let dev = k.dev(&v);
    assert_same(&read_dev(&dev), &Image::zeros(SIZE), "new volume");

    // Three generations, a snapshot after each, then the head moves on.
    let mut img = Image::zeros(SIZE);
    img.write(&dev, 0, MIB as usize, 1);
    img.write(&dev, 10 * MIB + 4096, 3 * MIB as usize / 2, 2);
    let gen1 = img.clone();
    let s1 = k.json(&["snapshot", "create", &vid, "--name", "gen1"]);
    assert_eq!(s1["volume_id"], vid.as_str());
    assert_eq!(s1["status"], "available");
    assert_eq!(s1["forced"], false);
    assert_eq!(s1["backend"], b);
    let s1id = s(&s1, "id");
    assert_eq!(
        s(&s1, "provider_location"),
        format!("{}/_snapshot-{s1id}", k.vg())
    );
    assert_eq!(k.json(&["snapshot", "show", &s1id]), s1);
    let (_, _, origin) = k.lv(&format!("_snapshot-{s1id}")).expect("snapshot LV");
    assert_eq!(origin, vlv);
    img.write(&dev, MIB / 2, MIB as usize, 3);
    let gen2 = img.clone();
    let s2id = s(
        &k.json(&["snapshot", "create", &vid, "--name", "gen2"]),
        "id",
    );
    img.write(&dev, 6 * MIB, 2 * MIB as usize, 4);
    let gen3 = img.clone();
    let s3id = s(
        &k.json(&["snapshot", "create", &vid, "--name", "gen3"]),
        "id",
    );
    img.write(&dev, 0, 4 * MIB as usize, 5);
    let gen4 = img.clone();
    assert_same(&read_dev(&dev), &gen4, "head after gen4 writes");
    let mut want_lvs = vec![
        vlv.clone(),
        format!("_snapshot-{s1id}"),
        format!("_snapshot-{s2id}"),
        format!("_snapshot-{s3id}"),
    ];
    want_lvs.sort();
    assert_eq!(k.kiln_lvs(), want_lvs);
    let snaps = k.json(&["snapshot", "list", "--volume", &vid]);
    assert_eq!(snaps.as_array().unwrap().len(), 3, "{snaps}");

    // Export: exact bytes; the printed sha256 is the image's.
    for (sid, want) in [(&s1id, &gen1), (&s2id, &gen2), (&s3id, &gen3)] {
        let (data, e) = k.export(sid);
        assert_same(&data, want, &format!("export of {sid}"));
        assert_eq!(s(&e, "sha256"), want.sha256(), "{e}");
        assert_eq!(e["size_bytes"], SIZE, "{e}");
    }
    // To stdout: the image on stdout, the summary with the same sha256 on stderr.
    let o = k.run(&["snapshot", "export", &s2id, "--output", "-"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&o.stdout, &gen2, "export of gen2 to stdout");
    assert!(String::from_utf8_lossy(&o.stderr).contains(&gen2.sha256()));

    // Clone gen2 into a larger volume; read it back; writes to it touch nothing else.
    let c = k.json(&[
        "volume",
        "create",
        "--snapshot",
        &s2id,
        "--size",
        "24M",
        "--name",
        "clone",
    ]);
    assert_eq!(c["source_snapshot_id"], s2id.as_str());
    assert_eq!(c["size_bytes"], 24 * MIB);
    assert_eq!(c["backend"], b);
    assert_eq!(c["status"], "available");
    let cid = s(&c, "id");
    let clv = format!("volume-{cid}");
    let (_, csize, _) = k.lv(&clv).expect("clone LV missing");
    assert_eq!(csize, 24 * MIB);
    let cdev = k.dev(&c);
    let mut cimg = gen2.resized(24 * MIB);
    assert_same(&read_dev(&cdev), &cimg, "clone of gen2");
    cimg.write(&cdev, 20 * MIB, MIB as usize, 6);
    cimg.write(&cdev, MIB, MIB as usize, 7);
    assert_same(&read_dev(&cdev), &cimg, "clone after writes");
    assert_same(&k.export(&s2id).0, &gen2, "gen2 after writing the clone");
    assert_same(&read_dev(&dev), &gen4, "origin after writing the clone");

    // Revert to the OLDEST of three: the head is gen1, all three snapshots intact.
    let r = k.json(&["snapshot", "revert", &s1id]);
    assert_eq!(r["id"], vid.as_str());
    assert_eq!(r["status"], "available");
    assert_same(&read_dev(&dev), &gen1, "head after revert to gen1");
    let mut with_clone = want_lvs.clone();
    with_clone.push(clv.clone());
    with_clone.sort();
    assert_eq!(k.kiln_lvs(), with_clone, "LVs after revert");
    for (sid, want) in [(&s1id, &gen1), (&s2id, &gen2), (&s3id, &gen3)] {
        assert_same(&k.export(sid).0, want, &format!("{sid} after revert"));
    }
    assert_eq!(
        k.json(&["snapshot", "list", "--volume", &vid])
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_same(&read_dev(&cdev), &cimg, "clone after revert");

    // Lineage: volume -> gen1, gen2 (-> clone), gen3.
    let t = k.json(&["snapshot", "tree", &vid]);
    assert_eq!(t["volume"]["id"], vid.as_str(), "{t}");
    let tsnaps = t["snapshots"].as_array().unwrap();
    assert_eq!(tsnaps.len(), 3, "{t}");
    let node = |sid: &str| {
        tsnaps
            .iter()
            .find(|n| n["snapshot"]["id"] == sid)
            .unwrap_or_else(|| panic!("{sid} not in tree {t}"))
    };
    assert_eq!(node(&s1id)["clones"], json!([]));
    assert_eq!(node(&s2id)["clones"][0]["volume"]["id"], cid.as_str());
    assert_eq!(node(&s3id)["clones"], json!([]));
    let text = k.run(&["snapshot", "tree", &vid]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("gen2") && text.contains(&cid), "{text}");

    // Attached: a plain snapshot is refused and changes nothing; --force works.
    let a = k.attach(&vid, "3f1c2a0e-8a4b-4c5d-9e6f-7a8b9c0d1e2f", "/dev/vdb");
    assert_eq!(a["status"], "in-use");
    assert_eq!(a["attachments"][0]["device"], "/dev/vdb");
    let before = k.state();
    let msg = k.fails(&["snapshot", "create", &vid], 5);
    assert!(msg.contains("in-use") && msg.contains("--force"), "{msg}");
    assert_eq!(before, k.state(), "a refused snapshot changed something");
    let f = k.json(&["snapshot", "create", &vid, "--force", "--name", "online"]);
    assert_eq!(f["forced"], true);
    assert_eq!(f["status"], "available");
    let fid = s(&f, "id");
    assert!(k.lv(&format!("_snapshot-{fid}")).is_some());
    assert_same(&k.export(&fid).0, &gen1, "forced snapshot");
    let d = k.json(&["volume", "detach", &vid]);
    assert_eq!(d["status"], "available");
    assert_eq!(d["attachments"], json!([]));

    // Delete with snapshots: refused (the service checks its store), nothing changes.
    let before = k.state();
    let msg = k.fails(&["volume", "delete", &vid], 5);
    assert!(msg.contains("snapshot"), "{msg}");
    let after = k.state();
    assert_eq!(before.0, after.0, "volumes changed");
    assert_eq!(before.1, after.1, "snapshots changed");
    assert_eq!(before.2, after.2, "the VG changed");

    // Single snapshot delete; then --cascade removes the rest and the volume.
    let del = k.json(&["snapshot", "delete", &s3id]);
    assert_eq!(del["deleted"], true, "{del}");
    k.fails(&["snapshot", "show", &s3id], 3);
    assert!(k.lv(&format!("_snapshot-{s3id}")).is_none());
    assert_same(&k.export(&s1id).0, &gen1, "gen1 after deleting gen3");
    let del = k.json(&["volume", "delete", &vid, "--cascade"]);
    assert_eq!(del["deleted"], true, "{del}");
    k.fails(&["volume", "show", &vid], 3);
    for sid in [&s1id, &s2id, &fid] {
        k.fails(&["snapshot", "show", sid], 3);
    }
    // The clone is independent of its (deleted) snapshot and keeps its data.
    assert_eq!(k.kiln_lvs(), vec![clv.clone()]);
    assert_same(&read_dev(&cdev), &cimg, "clone after its origin is gone");
    k.json(&["volume", "delete", &cid]);
    assert_eq!(k.store(), (json!([]), json!([])));
    assert_eq!(k.kiln_lvs(), Vec::<String>::new());
}

#[test]
fn thin_every_command_through_the_cli() {
    lifecycle("thin");
}

#[test]
fn thick_every_command_through_the_cli() {
    lifecycle("thick");
}

/// A 10 MiB volume in a VG of 4 MiB extents (lvm makes a 12 MiB LV): export, the
/// default-sized clone and revert all work at exactly 10 MiB, and no successful command
/// writes to stderr (thin: also not an over-provisioned create, on which lvm warns).
fn odd_size(b: &str) {
    let _g = serial();
    let k = Kiln::new();
    let size = 10 * MIB;
    let v = k.quiet_json(&["volume", "create", "--size", "10M", "--backend", b]);
    assert_eq!(v["size_bytes"], size);
    let vid = s(&v, "id");
    let (_, lv_size, _) = k.lv(&format!("volume-{vid}")).expect("volume LV");
    assert_eq!(lv_size, 12 * MIB, "lvm rounds to whole extents");
    let dev = k.dev(&v);
    let mut img = Image::zeros(size);
    img.write(&dev, 0, size as usize, 21);
    // The extent slack beyond size_bytes is written too; it must never show.
    write_at(&dev, size, &pattern(22, 2 * MIB as usize));
    let snap = k.quiet_json(&["snapshot", "create", &vid]);
    assert_eq!(snap["size_bytes"], size);
    let sid = s(&snap, "id");

    let (data, e) = k.export(&sid);
    assert_same(&data, &img, "export of a 10 MiB snapshot");
    assert_eq!(e["size_bytes"], size, "{e}");
    assert_eq!(s(&e, "sha256"), img.sha256(), "{e}");

    // Clone at the default size: the snapshot's.
    let c = k.quiet_json(&["volume", "create", "--snapshot", &sid]);
    assert_eq!(c["size_bytes"], size, "{c}");
    assert_eq!(c["status"], "available", "{c}");
    assert_same(
        &read_dev(&k.dev(&c))[..size as usize],
        &img,
        "default-sized clone",
    );

    let mut later = img.clone();
    later.write(&dev, 0, 4 * MIB as usize, 23);
    let r = k.quiet_json(&["snapshot", "revert", &sid]);
    assert_eq!(r["status"], "available", "{r}");
    assert_same(
        &read_dev(&dev)[..size as usize],
        &img,
        "volume after revert",
    );

    k.quiet_json(&["volume", "delete", &s(&c, "id")]);
    k.quiet_json(&["volume", "delete", &vid, "--cascade"]);
    if b == "thin" {
        // Larger than the 256 MiB pool: lvcreate succeeds with "WARNING: Sum of all thin
        // volume sizes ..." on its stderr, which kiln must not echo.
        let big = k.quiet_json(&["volume", "create", "--size", "1G", "--backend", b]);
        k.quiet_json(&["volume", "delete", &s(&big, "id")]);
    }
    assert_eq!(k.kiln_lvs(), Vec::<String>::new());
}

#[test]
fn thin_size_not_a_multiple_of_the_extent_is_exact_and_quiet() {
    odd_size("thin");
}

#[test]
fn thick_size_not_a_multiple_of_the_extent_is_exact_and_quiet() {
    odd_size("thick");
}

#[test]
fn bad_input_and_wrong_states_change_neither_store_nor_vg() {
    let _g = serial();
    let k = Kiln::new();
    let unknown = "6a1d2e3f-4b5c-4d6e-8f70-8192a3b4c5d6";
    let never = k.path("never.raw");
    let never = never.to_str().unwrap().to_string();
    // Per backend: an available volume with data and a snapshot, and an attached one.
    let mut objs = Vec::new();
    for b in ["thin", "thick"] {
        let v = k.json(&["volume", "create", "--size", "16M", "--backend", b]);
        let mut img = Image::zeros(SIZE);
        img.write(&k.dev(&v), 4 * MIB, 2 * MIB as usize, 11);
        let vid = s(&v, "id");
        let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
        let w = k.json(&["volume", "create", "--size", "16M", "--backend", b]);
        let wid = s(&w, "id");
        let wsid = s(&k.json(&["snapshot", "create", &wid]), "id");
        // One device per volume: an instance cannot have two volumes at one device.
        let dev = if b == "thin" { "/dev/vdc" } else { "/dev/vdd" };
        k.attach(&wid, "0b6f7c0e-1111-4222-8333-944455556666", dev);
        objs.push((b, v, img, vid, sid, wid, wsid));
    }
    let before = k.state();

    let mut cases: Vec<(Vec<String>, i32)> = [
        (vec!["volume", "show", unknown], 3),
        (vec!["volume", "delete", unknown], 3),
        (vec!["volume", "delete", unknown, "--cascade"], 3),
        (vec!["volume", "detach", unknown], 3),
        (
            vec![
                "volume",
                "attach",
                unknown,
                "--instance",
                unknown,
                "--device",
                "/dev/vdd",
            ],
            3,
        ),
        (vec!["volume", "create", "--snapshot", unknown], 3),
        (
            vec!["volume", "create", "--size", "8M", "--backend", "nope"],
            3,
        ),
        (vec!["snapshot", "create", unknown], 3),
        (vec!["snapshot", "create", unknown, "--force"], 3),
        (vec!["snapshot", "show", unknown], 3),
        (vec!["snapshot", "delete", unknown], 3),
        (vec!["snapshot", "revert", unknown], 3),
        (vec!["snapshot", "tree", unknown], 3),
        (vec!["snapshot", "list", "--volume", unknown], 3),
        (vec!["snapshot", "export", unknown, "--output", &never], 3),
        (vec!["volume", "create", "--size", "0"], 4),
        (vec!["volume", "create", "--size", "1.5G"], 4),
        (vec!["volume", "show", "not-a-uuid"], 4),
        (
            vec!["volume", "create", "--size", "8M", "--name", "$(reboot)"],
            4,
        ),
    ]
    .into_iter()
    .map(|(a, c)| (a.into_iter().map(String::from).collect(), c))
    .collect();
    let owned = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    for (b, _, _, vid, _, wid, _) in &objs {
        cases.extend([
            (owned(&["volume", "delete", wid]), 5),
            (owned(&["volume", "detach", vid]), 5),
            (
                owned(&[
                    "volume",
                    "create",
                    "--size",
                    "8M",
                    "--backend",
                    b,
                    "--name",
                    "../../x",
                ]),
                4,
            ),
        ]);
    }
    // Unknown ids, malformed input and these state checks are refused before any backend
    // call; one state check after all of them (any change would persist to it) keeps this
    // test short under UML, where every kiln run costs seconds (each opens both backends).
    for (args, code) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        k.fails(&args, *code);
    }
    let after = k.state();
    assert_eq!(
        before, after,
        "a not-found or invalid-input case changed something"
    );
    // The refusals the brief singles out, on real objects of both backends: checked one by one.
    let mut cases: Vec<(Vec<String>, i32)> = Vec::new();
    for (_, _, _, vid, sid, wid, wsid) in &objs {
        cases.extend([
            // plain snapshot of an in-use volume; revert of an in-use volume
            (owned(&["snapshot", "create", wid]), 5),
            (owned(&["snapshot", "revert", wsid]), 5),
            // delete of a volume with snapshots (thick: the driver would say busy; the
            // service refuses first); --cascade of an in-use volume
            (owned(&["volume", "delete", vid]), 5),
            (owned(&["volume", "delete", wid, "--cascade"]), 5),
            // a clone smaller than its snapshot
            (
                owned(&["volume", "create", "--snapshot", sid, "--size", "8M"]),
                4,
            ),
        ]);
    }
    for (args, code) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        k.fails(&args, *code);
        let after = k.state();
        assert_eq!(before.0, after.0, "kiln {args:?} changed the volumes");
        assert_eq!(before.1, after.1, "kiln {args:?} changed the snapshots");
        assert_eq!(before.2, after.2, "kiln {args:?} changed the VG");
    }
    assert!(!Path::new(&never).exists());
    for (b, v, img, vid, sid, wid, _) in &objs {
        assert_same(
            &read_dev(&k.dev(v)),
            img,
            &format!("{b} head after refusals"),
        );
        assert_same(
            &k.export(sid).0,
            img,
            &format!("{b} snapshot after refusals"),
        );
        k.json(&["volume", "detach", wid]);
        k.json(&["volume", "delete", wid, "--cascade"]);
        k.json(&["volume", "delete", vid, "--cascade"]);
    }
    assert_eq!(k.kiln_lvs(), Vec::<String>::new());
}

#[test]
fn bench_snapshot_reports_kiln_and_the_lvcreate_primitive_and_cleans_up() {
    let _g = serial();
    let k = Kiln::new();
    for b in ["thin", "thick"] {
        let before = k.state();
        let r = k.json(&[
            "bench",
            "snapshot",
            "--backend",
            b,
            "--size",
            "16M",
            "--iterations",
            "2",
        ]);
        assert_bench_timings(&r);
        assert!(
            s(&r, "primitive").contains("lvcreate --snapshot"),
            "primitive: {r}"
        );
        assert_eq!(r["backend"], b, "{r}");
        assert_eq!(r["size_bytes"], SIZE, "{r}");
        assert_eq!(r["iterations"], 2, "{r}");
        assert!(r["create_ratio"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(before, k.state(), "the {b} bench left something behind");
    }
}

/// `[backends.files]` for the backup tests: raw files in the data directory. The guest's /tmp
/// is a tmpfs, which has no reflink, so raw runs as full copies there.
const FILES_BACKEND: &str = "\n[backends.files]\ndriver = \"file\"\npath = \"files\"\n\
                             format = \"raw\"\nallow_full_copy = true\n";

/// A volume restored from a backup holds exactly the backed-up snapshot: the export of a
/// snapshot of the restored volume equals `want` (the backed-up snapshot's export) byte for
/// byte. The restored volume (and that snapshot) is deleted again.
fn assert_restored(k: &Kiln, restored: &Value, want: &[u8], what: &str) {
    assert_eq!(restored["status"], "available", "{what}: {restored}");
    let vid = s(restored, "id");
    let snap = s(&k.json(&["snapshot", "create", &vid]), "id");
    let (got, _) = k.export(&snap);
    assert_same_bytes(&got, want, what, ("MiB", MIB));
    k.json(&["volume", "delete", &vid, "--cascade"]);
}

/// The `stream` figures of a `backup create` as (read, data, zero) bytes.
fn stream_of(b: &Value) -> (u64, u64, u64) {
    let f = |k: &str| {
        b["stream"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("no stream.{k} in {b}"))
    };
    (f("read_bytes"), f("data_bytes"), f("zero_bytes"))
}

/// Backups of LVM volumes to a `dir:` target, on the real LVM of the guest.
///
/// Thin: a 64 MiB volume with 28 MiB of data in two ranges (holes between), a full backup,
/// then an incremental after a 64 KiB rewrite and 128 KiB zeroed by writing zeros, then one
/// after a 4 KiB write into a hole. The chain is full <- inc1 <- inc2; the full backup reads
/// only the mapped data (thin_dump), each incremental only the pool chunks `thin_delta`
/// lists (at most 2 MiB, far from the data). Every backup verifies, and each is restored
/// onto thick, thin and a raw file volume: each restored volume exports exactly the
/// backed-up snapshot's bytes, which equal the model of the volume at that backup. The last
/// is restored over an existing thick volume full of other data: the result is the backup,
/// the old data zeroed (holes included).
///
/// Thick: a full backup and an incremental after a 64 KiB rewrite. COW snapshots keep no
/// record of what changed, so the incremental reads both snapshots whole: read_bytes is
/// exactly twice the size (the documented cost); it restores onto thin exactly.
///
/// Diff streams: `snapshot diff B --from A` of two thin snapshots, applied by `volume
/// import-diff` onto a fresh thick volume that first got the full stream of A: each snapshot
/// the import takes equals its original.
#[test]
fn lvm_backups_full_and_incremental_restore_onto_thick_thin_and_file() {
    let _g = serial();
    let k = Kiln::with_extra_config(FILES_BACKEND);
    let size = 64 * MIB;
    let target_dir = k.path("backups");
    std::fs::create_dir(&target_dir).unwrap();
    let target = format!("dir:{}", target_dir.display());
    let backup = |vid: &str, incremental: bool| {
        let mut args = vec!["backup", "create", vid, "--target", &target];
        if incremental {
            args.push("--incremental");
        }
        let b = k.json(&args);
        assert_eq!(b["status"], "available", "{b}");
        assert_eq!(b["volume_id"], vid, "{b}");
        assert_eq!(b["size_bytes"], size, "{b}");
        assert_eq!(b["target"], target.as_str(), "{b}");
        b
    };

    // --- thin: full, then two incrementals; the model's sha256 at each backup.
    let v = k.json(&["volume", "create", "--size", "64M", "--backend", "thin"]);
    let vid = s(&v, "id");
    let dev = k.dev(&v);
    let mut sums = Vec::new();
    let (thin, inc1, inc2) = {
        let mut img = Image::zeros(size);
        img.write(&dev, 0, 20 * MIB as usize, 101);
        img.write(&dev, 40 * MIB, 8 * MIB as usize, 102);
        let full = backup(&vid, false);
        sums.push(img.sha256());
        img.write(&dev, 2 * MIB + 64 * 1024, 64 * 1024, 103);
        img.zero(&dev, 44 * MIB, 128 * 1024);
        let inc1 = backup(&vid, true);
        sums.push(img.sha256());
        img.write(&dev, 30 * MIB + 4096, 4096, 104);
        let inc2 = backup(&vid, true);
        sums.push(img.sha256());
        (full, inc1, inc2)
    };
    assert_eq!(thin["parent_id"], Value::Null, "{thin}");
    assert_eq!(inc1["parent_id"], thin["id"], "{inc1}");
    assert_eq!(inc2["parent_id"], inc1["id"], "{inc2}");
    // The full backup reads the 28 MiB of mapped data (whole pool chunks), not the holes.
    let (read, data, zero) = stream_of(&thin);
    assert_eq!(data, 28 * MIB, "{thin}");
    assert_eq!(zero, 0, "{thin}");
    assert!(
        (28 * MIB..=29 * MIB).contains(&read),
        "full read {read}: {thin}"
    );
    // Incrementals: 192 KiB changed (128 KiB of it now zeros), then 4 KiB; thin_delta's
    // pool chunks keep the reads small.
    for (b, changed) in [(&inc1, 192 * 1024), (&inc2, 4096)] {
        let (read, data, zero) = stream_of(b);
        assert!(
            read >= changed && read <= 2 * MIB,
            "incremental read {read} for {changed} changed bytes: {b}"
        );
        assert!(data + zero >= changed && data + zero <= 2 * MIB, "{b}");
        assert!(b["stored_bytes"].as_u64().unwrap() <= 2 * MIB + 4096, "{b}");
    }
    assert!(
        stream_of(&inc1).2 >= 128 * 1024,
        "zeroed range not in {inc1}"
    );
    eprintln!(
        "thin backups (read, data, zero bytes): full {:?}, inc1 {:?}, inc2 {:?}",
        stream_of(&thin),
        stream_of(&inc1),
        stream_of(&inc2)
    );
    let chain: Vec<Value> = k
        .json(&["backup", "list", "--volume", &vid])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].clone())
        .collect();
    assert_eq!(
        chain,
        vec![thin["id"].clone(), inc1["id"].clone(), inc2["id"].clone()]
    );

    // --- thick: full, then an incremental that can only compare both snapshots whole.
    let t = k.json(&["volume", "create", "--size", "64M", "--backend", "thick"]);
    let tid = s(&t, "id");
    let tdev = k.dev(&t);
    let tfull = {
        let mut timg = Image::zeros(size);
        timg.write(&tdev, MIB, 12 * MIB as usize, 111);
        backup(&tid, false)
    };
    write_at(&tdev, 5 * MIB, &pattern(112, 64 * 1024));
    let tinc = backup(&tid, true);
    assert_eq!(tfull["parent_id"], Value::Null, "{tfull}");
    assert_eq!(tinc["parent_id"], tfull["id"], "{tinc}");
    assert_eq!(
        stream_of(&tfull).0,
        size,
        "thick full reads the volume once: {tfull}"
    );
    assert_eq!(stream_of(&tfull).1, 12 * MIB, "{tfull}");
    let (read, data, zero) = stream_of(&tinc);
    assert_eq!(
        read,
        2 * size,
        "thick incremental reads both snapshots: {tinc}"
    );
    assert_eq!((data, zero), (64 * 1024, 0), "{tinc}");

    // --- every backup verifies, with the stream create reported.
    for b in [&thin, &inc1, &inc2, &tfull, &tinc] {
        let r = k.json(&["backup", "verify", &s(b, "id")]);
        assert_eq!(r["backup_id"], b["id"], "{r}");
        assert_eq!(r["data_bytes"], b["stream"]["data_bytes"], "{r} vs {b}");
        assert_eq!(r["zero_bytes"], b["stream"]["zero_bytes"], "{r} vs {b}");
    }

    // --- each thin backup restored onto every backend equals its snapshot.
    for (b, sum) in [(&thin, &sums[0]), (&inc1, &sums[1]), (&inc2, &sums[2])] {
        let (want, e) = k.export(&s(b, "snapshot_id"));
        assert_eq!(&s(&e, "sha256"), sum, "snapshot of {b} is not the model");
        for dst in ["thick", "thin", "files"] {
            let r = k.json(&["backup", "restore", &s(b, "id"), "--backend", dst]);
            assert_eq!(r["backend"], dst, "{r}");
            assert_eq!(r["size_bytes"], size, "{r}");
            let what = format!("backup {} restored onto {dst}", s(b, "id"));
            assert_restored(&k, &r, &want, &what);
        }
    }
    // The thick chain restores too.
    let (want, _) = k.export(&s(&tinc, "snapshot_id"));
    let r = k.json(&["backup", "restore", &s(&tinc, "id"), "--backend", "thin"]);
    assert_restored(&k, &r, &want, "thick incremental restored onto thin");

    // --- over an existing thick volume full of other data: exactly the backup.
    let (want, _) = k.export(&s(&inc2, "snapshot_id"));
    let o = k.json(&["volume", "create", "--size", "64M", "--backend", "thick"]);
    let oid = s(&o, "id");
    write_at(k.dev(&o), 0, &pattern(120, size as usize));
    let r = k.json(&["backup", "restore", &s(&inc2, "id"), "--volume", &oid]);
    assert_eq!(r["id"], oid.as_str(), "{r}");
    assert_eq!(r["backend"], "thick", "{r}");
    assert_restored(&k, &r, &want, "backup restored over a thick volume");
    drop(want);

    // --- diff streams: full(A) then diff(A..B) of thin snapshots, imported onto thick.
    let (a, b) = (s(&thin, "snapshot_id"), s(&inc1, "snapshot_id"));
    let (full, inc) = (k.path("full-a.diff"), k.path("a-b.diff"));
    let fa = k.json(&["snapshot", "diff", &a, "--output", full.to_str().unwrap()]);
    assert_eq!(fa["from_snapshot_id"], Value::Null, "{fa}");
    let ab = k.json(&[
        "snapshot",
        "diff",
        &b,
        "--from",
        &a,
        "--output",
        inc.to_str().unwrap(),
    ]);
    assert_eq!(ab["from_snapshot_id"], a.as_str(), "{ab}");
    let read = ab["read_bytes"].as_u64().unwrap();
    assert!(
        (192 * 1024..=2 * MIB).contains(&read),
        "diff read {read}: {ab}"
    );
    assert!(ab["zero_bytes"].as_u64().unwrap() >= 128 * 1024, "{ab}");
    let d = s(
        &k.json(&["volume", "create", "--size", "64M", "--backend", "thick"]),
        "id",
    );
    let imported = k.import_full_then_incremental(&d, &full, &inc, &a, &b);
    for ((_, want, got), orig) in imported.into_iter().zip([&a, &b]) {
        assert_same_bytes(
            &got,
            &want,
            &format!("thick import of thin snapshot {orig}"),
            ("MiB", MIB),
        );
    }
    k.json(&["volume", "delete", &d, "--cascade"]);
}
