//! End-to-end tests of the `kiln` binary on the file backend: raw+reflink on a real XFS and
//! qcow2 with the real qemu-img. Needs root (loop mount) and xfsprogs/qemu-utils
//! (tests/install-deps.sh).

mod common;

use common::{
    Kiln, apply_stream, assert_bench_timings, backend_row, image, listing, s, sha256_hex, write_at,
};
use kiln_testkit::pattern;

const MIB: u64 = 1 << 20;

#[test]
fn raw_lifecycle_keeps_every_point_in_time() {
    let k = Kiln::new();
    let v = k.json(&["volume", "create", "--size", "64M", "--name", "db disk"]);
    for key in [
        "id",
        "name",
        "status",
        "size_bytes",
        "backend",
        "created_at",
        "provider_location",
        "source_snapshot_id",
        "attachments",
    ] {
        assert!(v.get(key).is_some(), "volume JSON lacks {key}: {v}");
    }
    assert_eq!(v["status"], "available");
    assert_eq!(v["size_bytes"], 64 * MIB);
    assert_eq!(v["backend"], "raw");
    let vid = s(&v, "id");
    let path = s(&v, "provider_location");
    assert_eq!(
        path,
        k.raw_dir().join(format!("volume-{vid}")).to_string_lossy()
    );

    // Generation 1: data at two offsets, a hole between.
    let (a1, b1) = (pattern(1, MIB as usize), pattern(2, 3 * MIB as usize / 2));
    write_at(&path, 0, &a1);
    write_at(&path, 40 * MIB, &b1);
    let gen1 = image(64 * MIB, &[(0, &a1), (40 * MIB, &b1)]);
    let s1 = k.json(&["snapshot", "create", &vid, "--name", "gen1"]);
    assert_eq!(s1["volume_id"], vid.as_str());
    assert_eq!(s1["status"], "available");
    let s1id = s(&s1, "id");

    // Generation 2 overwrites part of it; a second snapshot.
    let a2 = pattern(3, MIB as usize);
    write_at(&path, 512 * 1024, &a2);
    let gen2 = image(64 * MIB, &[(0, &a1), (40 * MIB, &b1), (512 * 1024, &a2)]);
    let s2id = s(&k.json(&["snapshot", "create", &vid]), "id");
    write_at(&path, 0, &pattern(4, 4 * MIB as usize));

    // Export gen1: exact bytes, sparse, and the printed sha256 is the image's.
    let out = k.dir.path().join("gen1.raw");
    let e = k.json(&[
        "snapshot",
        "export",
        &s1id,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), gen1);
    assert_eq!(s(&e, "sha256"), sha256_hex(&gen1));
    assert!(
        e["data_bytes_written"].as_u64().unwrap() < 64 * MIB,
        "export was not sparse: {e}"
    );
    // Export to stdout gives the same bytes.
    let o = k.run(&["snapshot", "export", &s2id, "--output", "-"]);
    assert!(o.status.success());
    assert_eq!(o.stdout, gen2);

    // Clone from gen1 (lineage recorded), larger than the snapshot.
    let c = k.json(&[
        "volume",
        "create",
        "--snapshot",
        &s1id,
        "--size",
        "128M",
        "--name",
        "clone",
    ]);
    assert_eq!(c["source_snapshot_id"], s1id.as_str());
    assert_eq!(c["size_bytes"], 128 * MIB);
    let cdata = std::fs::read(s(&c, "provider_location")).unwrap();
    assert_eq!(&cdata[..gen1.len()], &gen1[..]);
    assert!(cdata[gen1.len()..].iter().all(|b| *b == 0));

    // Revert to the OLDER snapshot; the newer one stays intact.
    let r = k.json(&["snapshot", "revert", &s1id]);
    assert_eq!(r["status"], "available");
    assert_eq!(std::fs::read(&path).unwrap(), gen1);
    let out2 = k.dir.path().join("gen2.raw");
    k.json(&[
        "snapshot",
        "export",
        &s2id,
        "--output",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out2).unwrap(), gen2);

    // Lineage tree: volume -> gen1 -> clone.
    let t = k.json(&["snapshot", "tree", &vid]);
    assert_eq!(t["volume"]["id"], vid.as_str());
    assert_eq!(t["snapshots"][0]["snapshot"]["id"], s1id.as_str());
    assert_eq!(t["snapshots"][0]["clones"][0]["volume"]["id"], c["id"]);
    let text = k.run(&["snapshot", "tree", &vid]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("\"gen1\""));

    // Attach: plain snapshot refused (wrong state), forced allowed (reflink is atomic).
    let inst = "3f1c2a0e-8a4b-4c5d-9e6f-7a8b9c0d1e2f";
    let a = k.attach(&vid, inst, "/dev/vdb");
    assert_eq!(a["status"], "in-use");
    assert_eq!(a["attachments"][0]["device"], "/dev/vdb");
    let msg = k.fails(&["snapshot", "create", &vid], 5);
    assert!(msg.contains("in-use") && msg.contains("--force"), "{msg}");
    let f = k.json(&["snapshot", "create", &vid, "--force"]);
    assert_eq!(f["forced"], true);
    k.fails(&["snapshot", "revert", &s1id], 5);
    k.fails(&["volume", "delete", &vid, "--cascade"], 5);
    k.json(&["volume", "detach", &vid]);

    // Deletes: refused with snapshots, cascade removes everything of the volume.
    let msg = k.fails(&["volume", "delete", &vid], 5);
    assert!(msg.contains("3 snapshot(s)"), "{msg}");
    k.json(&["snapshot", "delete", &s2id]);
    k.fails(&["snapshot", "show", &s2id], 3);
    k.json(&["volume", "delete", &vid, "--cascade"]);
    k.json(&["volume", "delete", s(&c, "id").as_str()]);
    assert_eq!(k.json(&["volume", "list"]), serde_json::json!([]));
    assert_eq!(k.json(&["snapshot", "list"]), serde_json::json!([]));
    assert!(
        common::listing(&k.raw_dir())
            .iter()
            .all(|n| n.starts_with('.')),
        "{:?}",
        common::listing(&k.raw_dir())
    );
}

#[test]
fn qcow2_lifecycle_through_the_cli() {
    let k = Kiln::new();
    let v = k.json(&["volume", "create", "--backend", "qcow", "--size", "32M"]);
    assert_eq!(v["backend"], "qcow");
    let vid = s(&v, "id");
    // Data goes where a hypervisor would write it: the volume's active qcow2 layer.
    let write = |off: u64, data: &[u8]| k.qemu_io_write(&k.qcow_active(&vid), off, data);
    let export_sha = |sid: &str, name: &str| {
        let out = k.dir.path().join(name);
        let e = k.json(&["snapshot", "export", sid, "--output", out.to_str().unwrap()]);
        assert_eq!(e["size_bytes"], 32 * MIB);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 32 * MIB);
        s(&e, "sha256")
    };
    let (g1, g2, g3) = (
        pattern(71, 2 << 20),
        pattern(72, 2 << 20),
        pattern(73, 2 << 20),
    );
    write(0, &g1);
    let s1 = s(
        &k.json(&["snapshot", "create", &vid, "--name", "one"]),
        "id",
    );
    write(4 * MIB, &g2);
    let s2 = s(
        &k.json(&["snapshot", "create", &vid, "--name", "two"]),
        "id",
    );
    write(0, &g3);
    let s3 = s(
        &k.json(&["snapshot", "create", &vid, "--name", "three"]),
        "id",
    );
    let img1 = image(32 * MIB, &[(0, &g1)]);
    let img2 = image(32 * MIB, &[(0, &g1), (4 * MIB, &g2)]);
    let img3 = image(32 * MIB, &[(0, &g3), (4 * MIB, &g2)]);
    let list = k.json(&["snapshot", "list", "--volume", &vid]);
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert_eq!(export_sha(&s1, "s1.raw"), sha256_hex(&img1));
    assert_eq!(export_sha(&s2, "s2.raw"), sha256_hex(&img2));
    assert_eq!(export_sha(&s3, "s3.raw"), sha256_hex(&img3));

    // Revert to the oldest: the volume holds its data (read back through a new snapshot),
    // the others are intact.
    k.json(&["snapshot", "revert", &s1]);
    let now = s(&k.json(&["snapshot", "create", &vid]), "id");
    assert_eq!(
        export_sha(&now, "now.raw"),
        sha256_hex(&img1),
        "revert to one"
    );
    k.json(&["snapshot", "delete", &now]);
    assert_eq!(export_sha(&s3, "s3b.raw"), sha256_hex(&img3));

    // Middle snapshot deleted: the chain is merged, the others stay readable and exact.
    k.json(&["snapshot", "delete", &s2]);
    assert_eq!(export_sha(&s1, "s1c.raw"), sha256_hex(&img1));
    assert_eq!(export_sha(&s3, "s3c.raw"), sha256_hex(&img3));
    let c = k.json(&["volume", "create", "--snapshot", &s3]);
    assert_eq!(c["backend"], "qcow");
    let cid = s(&c, "id");
    let cs = s(&k.json(&["snapshot", "create", &cid]), "id");
    assert_eq!(
        export_sha(&cs, "clone.raw"),
        sha256_hex(&img3),
        "clone holds snapshot three"
    );
    k.json(&["snapshot", "delete", &cs]);

    // An attached qcow2 volume cannot be switched to a new overlay behind the hypervisor:
    // unsupported, and nothing changes.
    k.attach(&vid, "0b6f7c0e-1111-4222-8333-944455556666", "/dev/vdc");
    let before = k.state();
    let msg = k.fails(&["snapshot", "create", &vid, "--force"], 7);
    assert!(msg.contains("unsupported"), "{msg}");
    assert_eq!(before, k.state());
    k.json(&["volume", "detach", &vid]);

    k.json(&["volume", "delete", &vid, "--cascade"]);
    k.json(&["volume", "delete", &cid]);
    assert_eq!(k.json(&["volume", "list"]), serde_json::json!([]));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let k = Kiln::new();
    let v = k.json(&["volume", "create", "--size", "64M"]);
    let vid = s(&v, "id");
    let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
    let exists = k.dir.path().join("exists.raw");
    std::fs::write(&exists, b"precious").unwrap();
    let exists = exists.to_str().unwrap().to_string();
    let missing_out = k.dir.path().join("never.raw");
    let missing_out = missing_out.to_str().unwrap().to_string();
    let unknown = "6a1d2e3f-4b5c-4d6e-8f70-8192a3b4c5d6";
    let before = k.state();

    let cases: Vec<(Vec<&str>, i32)> = vec![
        (vec!["volume", "create", "--size", "0"], 4),
        (vec!["volume", "create", "--size=-1G"], 4),
        (vec!["volume", "create", "--size", "1.5G"], 4),
        (vec!["volume", "create", "--size", "100P"], 4),
        (vec!["volume", "create", "--size", "65T"], 4),
        (
            vec!["volume", "create", "--size", "99999999999999999999G"],
            4,
        ),
        (vec!["volume", "create", "--size", "1G; rm -rf /"], 4),
        (vec!["volume", "create"], 4),
        (
            vec!["volume", "create", "--size", "1G", "--name", "$(reboot)"],
            4,
        ),
        (
            vec![
                "volume",
                "create",
                "--size",
                "1G",
                "--name",
                "../../etc/passwd",
            ],
            4,
        ),
        (vec!["volume", "create", "--size", "1G", "--name=-rf"], 4),
        (
            vec!["volume", "create", "--size", "1G", "--name", "a;b|c&d"],
            4,
        ),
        (
            vec!["volume", "create", "--size", "1G", "--name", "x\ny"],
            4,
        ),
        (
            vec!["volume", "create", "--size", "1G", "--backend", "../raw"],
            3,
        ),
        (
            vec!["volume", "create", "--size", "1G", "--backend", "nope"],
            3,
        ),
        (vec!["volume", "create", "--snapshot", unknown], 3),
        (vec!["volume", "create", "--snapshot", "../x"], 4),
        (
            vec!["volume", "create", "--snapshot", &sid, "--size", "1M"],
            4,
        ),
        (
            vec!["volume", "create", "--snapshot", &sid, "--backend", "qcow"],
            4,
        ),
        (vec!["volume", "show", "not-a-uuid"], 4),
        (vec!["volume", "show", "../../etc/passwd"], 4),
        (vec!["volume", "show", "--", "-rf"], 4),
        (vec!["volume", "show", unknown], 3),
        (vec!["volume", "delete", unknown], 3),
        (vec!["volume", "delete", &vid], 5),
        (vec!["volume", "detach", &vid], 5),
        (
            vec![
                "volume",
                "attach",
                &vid,
                "--instance",
                "`id`",
                "--device",
                "/dev/vdb",
            ],
            4,
        ),
        (
            vec![
                "volume",
                "attach",
                &vid,
                "--instance",
                unknown,
                "--device",
                "/dev/../sda",
            ],
            4,
        ),
        (
            vec![
                "volume",
                "attach",
                &vid,
                "--instance",
                unknown,
                "--device",
                "vdb; reboot",
            ],
            4,
        ),
        (vec!["snapshot", "create", unknown], 3),
        (vec!["snapshot", "create", &vid, "--name", "`reboot`"], 4),
        (vec!["snapshot", "show", unknown], 3),
        (vec!["snapshot", "delete", unknown], 3),
        (vec!["snapshot", "revert", unknown], 3),
        (vec!["snapshot", "tree", unknown], 3),
        (vec!["snapshot", "list", "--volume", unknown], 3),
        (
            vec!["snapshot", "export", unknown, "--output", &missing_out],
            3,
        ),
        (vec!["snapshot", "export", &sid, "--output", &exists], 4),
        (
            vec!["snapshot", "diff", unknown, "--output", &missing_out],
            3,
        ),
        (vec!["snapshot", "diff", &sid, "--output", &exists], 4),
        (
            vec!["snapshot", "diff", "../x", "--output", &missing_out],
            4,
        ),
        (vec!["volume", "reset-state", &vid, "--state", "bogus"], 4),
        (vec!["volume", "reset-state", &vid, "--state", "in-use"], 4),
        (
            vec![
                "volume",
                "reset-state",
                &vid,
                "--state",
                "error",
                "--reason",
                "$(reboot)",
            ],
            4,
        ),
        (
            vec!["volume", "reset-state", unknown, "--state", "error"],
            3,
        ),
        (
            vec!["snapshot", "reset-state", &sid, "--state", "in-use"],
            4,
        ),
        (
            vec!["snapshot", "reset-state", unknown, "--state", "error"],
            3,
        ),
        (vec!["volume", "history", unknown], 3),
        (vec!["snapshot", "history", unknown], 3),
        (vec!["volume", "flatten", unknown], 3),
        (vec!["volume", "check", unknown], 3),
        (vec!["volume", "check", "--", "-rf"], 4),
        (vec!["bench", "snapshot", "--iterations", "0"], 4),
        (vec!["bench", "snapshot", "--size", "0"], 4),
        (
            vec![
                "bench",
                "snapshot",
                "--backend",
                "nope",
                "--iterations",
                "1",
            ],
            3,
        ),
    ];
    for (args, code) in &cases {
        k.fails(args, *code);
        assert_eq!(before, k.state(), "kiln {args:?} changed something");
    }
    assert_eq!(std::fs::read(&exists).unwrap(), b"precious");
    assert!(!std::path::Path::new(&missing_out).exists());

    // A config that does not parse, or a missing one, is a clear invalid-input error.
    let bad = k.dir.path().join("bad.toml");
    std::fs::write(&bad, "[backends.x]\ndriver = \"file\"\npath = 3\n").unwrap();
    for cfg in [bad.to_str().unwrap(), "/nonexistent/kiln.toml"] {
        let out = k
            .bare_cmd()
            .arg("--config")
            .arg(cfg)
            .args(["volume", "list"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(4),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    }
    assert_eq!(before, k.state());
}

#[test]
fn backend_list_and_bench_report_in_json() {
    let k = Kiln::new();
    let b = k.json(&["backend", "list"]);
    let raw = backend_row(&b, "raw");
    assert_eq!(raw["driver"], "file");
    assert_eq!(raw["default"], true);
    assert_eq!(raw["capabilities"]["thin"], true);
    assert_eq!(raw["capabilities"]["online_snapshot"], true);
    assert!(raw["stats"]["total_bytes"].as_u64().unwrap() > 0);
    let q = backend_row(&b, "qcow");
    assert_eq!(q["capabilities"]["online_snapshot"], false);

    for backend in ["raw", "qcow"] {
        let r = k.json(&[
            "bench",
            "snapshot",
            "--backend",
            backend,
            "--size",
            "64M",
            "--iterations",
            "3",
        ]);
        assert_bench_timings(&r);
        assert!(!s(&r, "primitive").is_empty());
        assert_eq!(r["iterations"], 3);
    }
    // The bench cleans up after itself.
    assert_eq!(k.json(&["volume", "list"]), serde_json::json!([]));
}

/// The sha256 the demo printed under the first step line containing `needle`.
fn demo_sha(stdout: &str, needle: &str) -> String {
    let mut lines = stdout.lines();
    lines
        .find(|l| l.starts_with('[') && l.contains(needle))
        .unwrap_or_else(|| panic!("no step {needle:?} in:\n{stdout}"));
    let sum = lines
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| l.trim_start().strip_prefix("sha256 "))
        .unwrap_or_else(|| panic!("step {needle:?} printed no sha256:\n{stdout}"));
    let hex = sum
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hex:?}"
    );
    hex
}

/// Both embedded defaults a machine without reflink gets (this machine's temp dir is ext4):
/// qcow2 with qemu-img in `PATH`, and raw full copies with a `PATH` holding no qemu-img. The
/// demo writes data through the volume's connection info, and its printed sums must show
/// what it claims: the snapshot holds what was written, the overwrite changes the volume,
/// the clone and the revert bring the snapshot's data back.
#[test]
fn demo_runs_on_the_embedded_default_without_a_config() {
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(std::env::temp_dir())
        .output()
        .unwrap();
    let fs = String::from_utf8_lossy(&fs.stdout).trim().to_string();
    assert!(
        fs == "ext2/ext3" || fs == "tmpfs",
        "the temp dir must be on a filesystem without reflink, found {fs}"
    );
    let no_qemu = tempfile::tempdir().unwrap();
    // qemu-img and qemu-io, but no qemu-storage-daemon (the stand-in hypervisor).
    let no_daemon = tempfile::tempdir().unwrap();
    for tool in ["qemu-img", "qemu-io"] {
        let real = String::from_utf8(
            std::process::Command::new("which")
                .arg(tool)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        std::os::unix::fs::symlink(real.trim(), no_daemon.path().join(tool)).unwrap();
    }
    let runs = [
        (
            std::env::var_os("PATH").unwrap(),
            "qcow2 external overlay",
            "qcow2 image",
        ),
        (
            no_daemon.path().into(),
            "qcow2 external overlay",
            "qcow2 image",
        ),
        (no_qemu.path().into(), "full sparse copy", "raw image"),
    ];
    for (run, (path, method, image)) in runs.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        // The demo's scratch files (exports, qcow2 data) go to TMPDIR: it must clean up.
        let scratch = dir.path().join("tmp");
        std::fs::create_dir(&scratch).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("demo")
            .env("KILN_DATA_DIR", dir.path().join("data"))
            .env("TMPDIR", &scratch)
            .env("PATH", &path)
            .env_remove("KILN_CONFIG")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.lines().next().unwrap_or_default().contains(method),
            "expected snapshots by {method}:\n{stdout}"
        );
        for needle in [
            "created volume",
            "lineage:",
            "deleted the clone, the volume and its snapshots",
        ] {
            assert!(
                stdout.contains(needle),
                "demo output lacks {needle:?}:\n{stdout}"
            );
        }
        let written = demo_sha(&stdout, "wrote ");
        assert!(
            stdout.contains(&format!("through the volume's connection info: {image}")),
            "{stdout}"
        );
        let snap = demo_sha(&stdout, "\"before-upgrade\" of the detached volume");
        let overwritten = demo_sha(&stdout, "overwrote the volume");
        let clone = demo_sha(&stdout, "cloned volume");
        let reverted = demo_sha(&stdout, "reverted volume");
        assert_eq!(written, snap, "the snapshot does not hold what was written");
        assert_ne!(overwritten, snap, "the overwrite changed nothing");
        assert_eq!(clone, snap, "the clone does not hold the snapshot's data");
        assert_eq!(reverted, snap, "the revert did not bring the snapshot back");
        assert_ne!(reverted, overwritten);
        let forced = stdout
            .lines()
            .find(|l| l.starts_with("[5] "))
            .unwrap_or_default();
        match run {
            // qcow2: the forced snapshot goes through the stand-in hypervisor's QMP monitor
            // while its guest writes, and the demo checked the image is one instant.
            0 => {
                assert!(
                    forced.contains("qemu-storage-daemon") && forced.contains("QMP monitor"),
                    "{forced}"
                );
                assert!(
                    stdout.contains("one instant of the guest's writes"),
                    "{stdout}"
                );
            }
            // Without qemu-storage-daemon that step is skipped, saying why.
            1 => assert!(
                forced.contains("skipped") && forced.contains("qemu-storage-daemon"),
                "{forced}"
            ),
            // Full copies cannot snapshot an attached volume: the demo says so, and why.
            _ => assert!(
                forced.contains("refuses a forced snapshot") && forced.contains("unsupported"),
                "{forced}"
            ),
        }
        // Cleaned up: no volume, no snapshot file, no scratch file.
        let volumes = dir.path().join("data").join("volumes");
        let left: Vec<String> = std::fs::read_dir(&volumes)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "kiln-file-backend.json" && n != ".locks")
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", volumes.display());
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
        assert!(dir.path().join("data").join("kiln.db").exists());
    }
}

#[test]
fn a_backend_that_cannot_open_is_listed_unavailable_and_changes_nothing() {
    let k = Kiln::new();
    let mut cfg = std::fs::read_to_string(&k.config).unwrap();
    cfg.push_str("\n[backends.gone]\ndriver = \"lvm\"\nvolume_group = \"kiln-no-such-vg\"\n");
    std::fs::write(&k.config, cfg).unwrap();
    let b = k.json(&["backend", "list"]);
    let gone = backend_row(&b, "gone");
    assert!(
        gone["unavailable"]
            .as_str()
            .unwrap()
            .contains("kiln-no-such-vg"),
        "{gone}"
    );
    let before = k.state();
    let msg = k.fails(
        &["volume", "create", "--backend", "gone", "--size", "8M"],
        8,
    );
    assert!(msg.contains("unavailable"), "{msg}");
    assert_eq!(before, k.state());
    // The other backends keep working.
    k.json(&["volume", "create", "--size", "8M"]);
}

/// Bad input is refused before anything is opened: on a fresh data directory not even the
/// directory (nor the store in it) comes into existence.
#[test]
fn bad_input_opens_nothing() {
    let k = Kiln::new();
    let unknown = "6a1d2e3f-4b5c-4d6e-8f70-8192a3b4c5d6";
    let cases: Vec<Vec<&str>> = vec![
        vec!["volume", "create", "--size", "0"],
        vec!["volume", "create", "--size", "1G", "--name", "$(reboot)"],
        vec!["volume", "show", "not-a-uuid"],
        vec!["snapshot", "create", "../x"],
        vec!["volume", "reset-state", unknown, "--state", "bogus"],
        vec![
            "volume",
            "attach",
            unknown,
            "--instance",
            unknown,
            "--device",
            "/dev/../sda",
        ],
        vec!["bench", "snapshot", "--iterations", "0"],
    ];
    for args in &cases {
        k.fails(args, 4);
        assert!(
            !k.data_dir().exists(),
            "kiln {args:?} created the data directory"
        );
    }
    assert!(listing(&k.raw_dir()).is_empty());
}

/// A command opens only the backends it needs: with a broken LVM backend configured, a
/// listing and a raw-backend operation never try to open it (its open would be logged).
#[test]
fn commands_open_only_the_backends_they_need() {
    let k = Kiln::new();
    let mut cfg = std::fs::read_to_string(&k.config).unwrap();
    cfg.push_str("\n[backends.gone]\ndriver = \"lvm\"\nvolume_group = \"kiln-no-such-vg\"\n");
    std::fs::write(&k.config, cfg).unwrap();
    for args in [
        vec!["volume", "list"],
        vec!["volume", "create", "--size", "8M"],
        vec!["snapshot", "list"],
    ] {
        let out = k.cmd(&args).env("KILN_LOG", "info").output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            !log.contains("gone"),
            "kiln {args:?} opened the lvm backend: {log}"
        );
        assert!(
            !log.contains("qcow"),
            "kiln {args:?} opened the qcow2 backend: {log}"
        );
    }
    // And `backend list` does open it, to say why it is unavailable.
    let out = k
        .cmd(&["backend", "list"])
        .env("KILN_LOG", "info")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("gone"));
}

/// A failure inside a driver (not a pre-validation refusal) is still one line on stderr at
/// the default log level, exits with the backend-failure code, and changes nothing. The
/// failure is real: the backend directory is made immutable (`chattr +i`), which even root
/// cannot write through.
#[test]
fn a_driver_failure_is_one_line_and_changes_nothing() {
    let k = Kiln::new();
    let vid = s(&k.json(&["volume", "create", "--size", "16M"]), "id");
    let qvid = s(
        &k.json(&["volume", "create", "--size", "16M", "--backend", "qcow"]),
        "id",
    );
    let before = k.state();
    let qdir = k.qcow_dir().join(format!("volume-{qvid}"));
    let frozen = [k.raw_dir(), qdir];
    for d in &frozen {
        let st = std::process::Command::new("chattr")
            .arg("+i")
            .arg(d)
            .status()
            .unwrap();
        assert!(st.success(), "chattr +i {}", d.display());
    }
    let results: Vec<String> = [
        vec!["snapshot", "create", vid.as_str()],
        vec!["snapshot", "create", qvid.as_str()],
        vec!["volume", "create", "--size", "8M"],
    ]
    .iter()
    .map(|args| k.fails(args, 8))
    .collect();
    for d in &frozen {
        let st = std::process::Command::new("chattr")
            .arg("-i")
            .arg(d)
            .status()
            .unwrap();
        assert!(st.success(), "chattr -i {}", d.display());
    }
    for msg in &results {
        assert!(msg.contains("Operation not permitted"), "{msg}");
    }
    assert_eq!(before, k.state(), "a failed driver call changed something");
    // Everything works again once the directory is writable.
    k.json(&["snapshot", "create", &vid]);
    k.json(&["snapshot", "create", &qvid]);
}

/// Admin reset-state and history, flatten and check, end to end.
#[test]
fn reset_state_history_flatten_and_check_through_the_cli() {
    let k = Kiln::new();
    let vid = s(
        &k.json(&["volume", "create", "--size", "16M", "--backend", "qcow"]),
        "id",
    );
    let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
    let v = k.json(&[
        "volume",
        "reset-state",
        &vid,
        "--state",
        "error",
        "--reason",
        "disk replaced",
    ]);
    assert_eq!(v["status"], "error");
    assert_eq!(v["status_reason"], "disk replaced");
    // An error volume cannot be snapshotted ...
    k.fails(&["snapshot", "create", &vid], 5);
    // ... until the admin says it is fine again.
    let v = k.json(&["volume", "reset-state", &vid, "--state", "available"]);
    assert_eq!(v["status"], "available");
    let h = k.json(&["volume", "history", &vid]);
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(
        (h[0]["from_status"].as_str(), h[0]["to_status"].as_str()),
        (Some("available"), Some("error"))
    );
    assert_eq!(h[0]["reason"], "disk replaced");
    assert_eq!(h[1]["reason"], "reset by an administrator");
    let sh = k.json(&["snapshot", "reset-state", &sid, "--state", "error_deleting"]);
    assert_eq!(sh["status"], "error_deleting");
    assert_eq!(
        k.json(&["snapshot", "history", &sid])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A clone, flattened (qcow2 clones are already independent: flatten is harmless).
    k.json(&["snapshot", "reset-state", &sid, "--state", "available"]);
    let cid = s(&k.json(&["volume", "create", "--snapshot", &sid]), "id");
    let c = k.json(&["volume", "flatten", &cid]);
    assert_eq!(c["status"], "available");
    // The qcow2 chain record agrees with the qcow2 headers.
    let r = k.json(&["volume", "check", &vid]);
    assert_eq!(r["consistent"], true, "{r}");
    assert!(r["findings"].as_array().unwrap().is_empty(), "{r}");
    // Deletes say what they did.
    let d = k.json(&["volume", "delete", &cid]);
    assert_eq!(d["backend"], "deleted");
}

/// `snapshot diff` writes Ceph's `rbd diff v1` stream (what `rbd import-diff` applies; the
/// real rbd applies it in the RBD suite): the snapshot's name and size, and its data, which
/// applied onto zeros gives exactly the snapshot's export — on both file formats, to a file
/// and to stdout; an existing output file is never overwritten.
#[test]
fn snapshot_diff_writes_an_rbd_diff_v1_stream_that_rebuilds_the_snapshot() {
    use kiln_core::diff_stream::{Record, read_records};
    let k = Kiln::new();
    for backend in ["raw", "qcow"] {
        let v = k.json(&["volume", "create", "--size", "16M", "--backend", backend]);
        let vid = s(&v, "id");
        let (a, b) = (pattern(1, 3 << 20), pattern(2, 5000));
        if backend == "raw" {
            let f = s(&v, "provider_location");
            write_at(&f, 1 << 20, &a);
            write_at(&f, (16 << 20) - 5000, &b);
        } else {
            let img = k.qcow_active(&vid);
            k.qemu_io_write(&img, 1 << 20, &a);
            k.qemu_io_write(&img, 12 << 20, &b[..4096]);
        }
        let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
        let (want, _) = k.export(&sid);
        let out = k.path(&format!("{backend}.diff"));
        let summary = k.json(&["snapshot", "diff", &sid, "--output", out.to_str().unwrap()]);
        let stream = std::fs::read(&out).unwrap();
        assert_eq!(summary["sha256"], sha256_hex(&stream), "{summary}");
        assert_eq!(summary["stream_bytes"], stream.len() as u64);
        assert_eq!(summary["size_bytes"], 16u64 << 20);
        let records = read_records(&stream[..]).unwrap();
        assert_eq!(records[0], Record::To(sid.clone()), "{backend}");
        assert_eq!(records[1], Record::Size(16 << 20), "{backend}");
        let mut got = vec![0u8; 16 << 20];
        let mut data = 0u64;
        for r in &records[2..] {
            match r {
                Record::Data { offset, data: d } => {
                    assert!(d.len() <= 4 << 20, "a record larger than an object");
                    got[*offset as usize..*offset as usize + d.len()].copy_from_slice(d);
                    data += d.len() as u64;
                }
                other => panic!("{backend}: unexpected record {other:?}"),
            }
        }
        assert_eq!(summary["data_bytes"], data);
        assert!(
            got == want,
            "{backend}: the stream does not rebuild the snapshot"
        );
        // To stdout: the same stream.
        let o = k.run(&["snapshot", "diff", &sid, "--output", "-"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            o.stdout == stream,
            "{backend}: stdout differs from the file"
        );
        // Never overwritten.
        let e = k.fails(
            &["snapshot", "diff", &sid, "--output", out.to_str().unwrap()],
            4,
        );
        assert!(e.contains("never overwrites"), "{e}");
        assert!(std::fs::read(&out).unwrap() == stream);
    }
}

/// `snapshot diff --from`: an incremental stream (from/to names, size, then only what
/// changed, rewrites as data and zeroed ranges as zero records) that, applied after the full
/// stream of the older snapshot, rebuilds the newer one byte for byte — and the backend's
/// tracking (reflink block maps, qcow2 layers) keeps the bytes read near the bytes changed.
/// Bad --from values are refused with one line, and no output file is left.
#[test]
fn snapshot_diff_from_an_older_snapshot_carries_only_the_changes() {
    let k = Kiln::new();
    for backend in ["raw", "qcow"] {
        let v = k.json(&["volume", "create", "--size", "64M", "--backend", backend]);
        let vid = s(&v, "id");
        let write = |off: u64, data: &[u8]| {
            if backend == "raw" {
                write_at(s(&v, "provider_location"), off, data);
            } else {
                k.qemu_io_write(&k.qcow_active(&vid), off, data);
            }
        };
        write(0, &pattern(1, 32 << 20));
        let a = s(&k.json(&["snapshot", "create", &vid]), "id");
        // 64 KiB rewritten, 128 KiB zeroed, 4 KiB near the end: 196 KiB of 64 MiB.
        write(2 << 20, &pattern(2, 64 << 10));
        write(3 << 20, &vec![0u8; 128 << 10]);
        write((64 << 20) - 8192, &pattern(3, 4096));
        let b = s(&k.json(&["snapshot", "create", &vid]), "id");
        let (full_a, inc) = (
            k.path(&format!("{backend}-a")),
            k.path(&format!("{backend}-ab")),
        );
        k.json(&["snapshot", "diff", &a, "--output", full_a.to_str().unwrap()]);
        let sum = k.json(&[
            "snapshot",
            "diff",
            &b,
            "--from",
            &a,
            "--output",
            inc.to_str().unwrap(),
        ]);
        assert_eq!(sum["from_snapshot_id"], a.as_str(), "{sum}");
        let mut img = Vec::new();
        apply_stream(&mut img, &std::fs::read(&full_a).unwrap());
        let names = apply_stream(&mut img, &std::fs::read(&inc).unwrap());
        assert_eq!(names, (Some(a.clone()), Some(b.clone())), "{backend}");
        let (want, _) = k.export(&b);
        assert!(img == want, "{backend}: full(a) + diff(a..b) is not b");
        // What changed is 196 KiB; the tracking granule (a 64 KiB qcow2 cluster, a 4 KiB
        // block) and the 64 KiB grain may round it up, never to the 32 MiB of data.
        let read = sum["read_bytes"].as_u64().unwrap();
        assert!(
            (196 << 10..=1 << 20).contains(&read),
            "{backend}: read {read}: {sum}"
        );
        let carried = sum["data_bytes"].as_u64().unwrap() + sum["zero_bytes"].as_u64().unwrap();
        assert!((196 << 10..=1 << 20).contains(&carried), "{backend}: {sum}");
        assert!(
            sum["zero_bytes"].as_u64().unwrap() >= 128 << 10,
            "{backend}: {sum}"
        );

        // Bad --from: itself, newer, another volume's, unknown — refused, nothing written.
        let other = s(
            &k.json(&["volume", "create", "--size", "1M", "--backend", backend]),
            "id",
        );
        let other_snap = s(&k.json(&["snapshot", "create", &other]), "id");
        let out = k.path(&format!("{backend}-bad"));
        let o = out.to_str().unwrap();
        for (from, to, code) in [
            (&b, &b, 4),
            (&b, &a, 4),
            (&other_snap, &b, 4),
            (&"5a0e0c1e-0000-4000-8000-000000000000".to_string(), &b, 3),
            (&"../x".to_string(), &b, 4),
        ] {
            let e = k.fails(
                &["snapshot", "diff", to, "--from", from, "--output", o],
                code,
            );
            assert_eq!(e.trim().lines().count(), 1, "{e}");
            assert!(!out.exists(), "{backend}: a refused diff left {o}");
        }
    }
}

/// `volume import-diff` applies streams as `rbd import-diff` does: the full stream of one
/// snapshot then the `--from` stream of the next rebuild both snapshots on another volume
/// (each snapshot taken under the stream's name, the second stream accepted because the
/// volume has the first's). Refused streams — from a snapshot the volume lacks, the wrong
/// size, truncated, not a stream — change nothing (every field of the store and the files
/// compared); a stream that breaks part-way on stdin leaves the volume `error` saying so.
#[test]
fn volume_import_diff_applies_full_and_incremental_streams_and_refuses_bad_ones() {
    use std::io::Write as _;
    let k = Kiln::new();
    let backend = "raw";
    let src = k.json(&["volume", "create", "--size", "16M", "--backend", backend]);
    let f = s(&src, "provider_location");
    write_at(&f, 0, &pattern(1, 6 << 20));
    let a = s(&k.json(&["snapshot", "create", &s(&src, "id")]), "id");
    write_at(&f, 1 << 20, &pattern(2, 64 << 10));
    write_at(&f, 4 << 20, &vec![0u8; 1 << 20]);
    write_at(&f, 15 << 20, &pattern(3, 4096));
    let b = s(&k.json(&["snapshot", "create", &s(&src, "id")]), "id");
    let (full, inc) = (k.path("full"), k.path("inc"));
    k.json(&["snapshot", "diff", &a, "--output", full.to_str().unwrap()]);
    k.json(&[
        "snapshot",
        "diff",
        &b,
        "--from",
        &a,
        "--output",
        inc.to_str().unwrap(),
    ]);
    let dst = s(
        &k.json(&["volume", "create", "--size", "16M", "--backend", backend]),
        "id",
    );

    // Refused, nothing changed: the incremental first (no snapshot named a), a truncated
    // file, garbage, a stream of another size, an unknown volume, a missing file.
    let small = k.json(&["volume", "create", "--size", "8M", "--backend", backend]);
    let bytes = std::fs::read(&inc).unwrap();
    let (trunc, junk) = (k.path("trunc"), k.path("junk"));
    std::fs::write(&trunc, &bytes[..bytes.len() - 10]).unwrap();
    std::fs::write(&junk, b"rbd diff v9\nhello").unwrap();
    let before = k.state();
    for (vol, input, code, says) in [
        (&dst, &inc, 4, "does not have"),
        (&dst, &trunc, 4, "truncated"),
        (&dst, &junk, 4, "rbd diff v1"),
        (&s(&small, "id"), &full, 4, "bytes"),
        (
            &"5a0e0c1e-0000-4000-8000-000000000000".to_string(),
            &full,
            3,
            "not found",
        ),
        (&dst, &k.path("missing"), 4, "does not exist"),
    ] {
        let e = k.fails(
            &[
                "volume",
                "import-diff",
                vol,
                "--input",
                input.to_str().unwrap(),
            ],
            code,
        );
        assert!(e.contains(says), "{e}");
        assert_eq!(
            k.state(),
            before,
            "a refused import-diff changed something: {e}"
        );
    }

    // Full, then incremental: each takes the stream's end snapshot by name.
    let imported = k.import_full_then_incremental(&dst, &full, &inc, &a, &b);
    for ((_, want, got), orig) in imported.into_iter().zip([&a, &b]) {
        assert!(got == want, "the imported snapshot {orig} differs");
    }

    // Broken part-way on stdin: the volume says so.
    let mut child = k
        .cmd(&["volume", "import-diff", &dst, "--input", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let full_bytes = std::fs::read(&full).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // All but the end of the last data record: the first 4 MiB record is written, then the
    // stream breaks (cut inside the first record, nothing would be written: `available`).
    stdin
        .write_all(&full_bytes[..full_bytes.len() - 1000])
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = k.json(&["volume", "show", &dst]);
    assert_eq!(
        v["status"],
        "error",
        "{v} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(v["status_reason"].as_str().unwrap().contains("part"), "{v}");
}

/// The suite runs on the store it is asked for: SQLite in the data directory by default,
/// the PostgreSQL database of its harness with `KILN_TEST_STORE=postgres` (then no SQLite
/// file appears, and the volume is a row in PostgreSQL).
#[test]
fn the_suite_runs_on_the_store_it_was_asked_for() {
    let k = Kiln::new();
    let v = k.json(&["volume", "create", "--size", "8M"]);
    let db = k.data_dir().join("kiln.db");
    match k.store_url() {
        None => assert!(db.exists()),
        Some(url) => {
            assert!(!db.exists(), "{} exists on a PostgreSQL run", db.display());
            let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
            let row = c
                .query_one(
                    "SELECT status, backend FROM volumes WHERE id = $1",
                    &[&s(&v, "id")],
                )
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "available");
            assert_eq!(row.get::<_, String>(1), "raw");
        }
    }
}

/// A backend local to another node is listed as such and refuses every operation with a
/// one-line error naming its node, before anything changes; with a shared store, a file or
/// LVM backend that names no node is a configuration error (checked before the store is
/// even contacted: the URL below answers nothing).
#[test]
fn backends_local_to_another_node_are_refused_and_shared_stores_need_placement() {
    let k = Kiln::new();
    let mut cfg = std::fs::read_to_string(&k.config).unwrap();
    cfg.push_str(
        "\n[backends.elsewhere]\ndriver = \"file\"\npath = \"elsewhere\"\nnode = \"other-node\"\n",
    );
    std::fs::write(&k.config, cfg).unwrap();
    let b = k.json(&["backend", "list"]);
    let row = backend_row(&b, "elsewhere");
    assert!(
        row["unavailable"]
            .as_str()
            .unwrap()
            .contains("local to node \"other-node\""),
        "{row}"
    );
    let before = k.state();
    let mut c = k.cmd(&["volume", "create", "--backend", "elsewhere", "--size", "8M"]);
    let out = c.env("KILN_NODE", common::TEST_NODE).output().unwrap();
    assert_eq!(out.status.code(), Some(8));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("local to node \"other-node\"")
            && err.contains("send the request to other-node"),
        "{err}"
    );
    assert_eq!(before, k.state());
    assert!(!k.data_dir().join("elsewhere").exists());

    let unplaced = k.path("unplaced.toml");
    for (backend, needle) in [
        ("driver = \"file\"\npath = \"x\"", "or `shared = true`"),
        (
            "driver = \"lvm\"\nvolume_group = \"vg\"",
            "must say which node",
        ),
        (
            "driver = \"lvm\"\nvolume_group = \"vg\"\nshared = true",
            "belongs to one host",
        ),
    ] {
        std::fs::write(&unplaced, format!("[backends.b]\n{backend}\n")).unwrap();
        let out = k
            .bare_cmd()
            .arg("--config")
            .arg(&unplaced)
            .args(["volume", "list"])
            .env("KILN_STORE_URL", "postgresql://kiln@127.0.0.1:1/none")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{backend}: {err}");
        assert!(err.contains(needle), "{backend}: {err}");
    }
}
