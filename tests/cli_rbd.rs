//! End-to-end tests of the `kiln` binary on a real Ceph cluster (RBD backend).
//!
//! Needs `--features rbd` (only then does the binary carry the RBD driver) and a running
//! cluster named by `CEPH_CONF`: `tests/harness/rbd-suite.sh` starts a throw-away one, runs
//! these tests and stops it. Without `CEPH_CONF` every test FAILS with instructions, and
//! built without the feature this file FAILS too (one test saying how to build it) rather
//! than passing with zero tests.
//!
//! Data reaches the images through the `rbd` CLI, used here as an independent test tool:
//! writes are `rbd import-diff` of a diff file the test writes itself (see `diff_file`),
//! reads are `rbd export`, and `rbd ls -l` / `rbd info` / `rbd snap ls` check what kiln did
//! on the cluster. Every external command is an argv vector, never a shell string.
//!
//! The tests share one pool, and several compare the whole pool listing before and after an
//! operation, so they run one at a time (`serial`) and nothing else may use the pool while
//! they run (rbd-suite.sh gives them a cluster of their own).

/// Built without the `rbd` feature the binary has no RBD driver, so none of the tests below
/// can run: fail, naming the command that runs them, instead of passing with zero tests.
#[cfg(not(feature = "rbd"))]
#[test]
fn rbd_feature_is_required() {
    panic!(
        "tests/cli_rbd.rs tests the kiln binary's RBD backend, which needs the `rbd` cargo \
         feature: run `cargo test -p kiln --features rbd --test cli_rbd` against a cluster \
         (tests/harness/rbd-suite.sh starts one, runs it and stops the cluster)"
    );
}

#[cfg(feature = "rbd")]
mod common;

#[cfg(feature = "rbd")]
mod rbd {
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    use kiln_testkit::pattern;
    use serde_json::Value;

    use crate::common::rbd::{
        ceph_conf, diff_file, pool_listing, rbd, rbd_images, rbd_json, rbd_snaps,
    };
    use crate::common::{
        self, Runner, assert_bench_timings, assert_same_bytes, backend_row, check_failure, image,
        run_bounded, s, serial, sha256_hex, unique_token, write_at,
    };

    const MIB: u64 = 1 << 20;
    /// 16 objects of 4 MiB: small enough for a memstore OSD.
    const SIZE: u64 = 64 * MIB;
    /// Hang guard for one kiln or rbd command (a correctness bound, not a performance target).
    const COMMAND_LIMIT: Duration = Duration::from_secs(180);

    /// First differing byte (and its 4 MiB RADOS object), for readable failures on 64 MiB
    /// comparisons.
    fn assert_same(got: &[u8], want: &[u8], what: &str) {
        assert_same_bytes(got, want, what, ("object", 4 * MIB));
    }

    /// A kiln data directory and config with one RBD backend `ceph` (the default) on the test
    /// cluster's pool `rbd`; the cluster needs no fixture of the test's own.
    type Kiln = common::Kiln<()>;

    impl Kiln {
        fn new() -> Kiln {
            let conf = ceph_conf();
            let config = format!(
                "default_backend = \"ceph\"\n\n[backends.ceph]\ndriver = \"rbd\"\nceph_conf = {:?}\npool = \"rbd\"\n",
                conf.to_str().unwrap()
            );
            common::Kiln::with_config(tempfile::tempdir().unwrap(), &config, ())
                .runner(Runner::Bounded(COMMAND_LIMIT))
                .failures_leave_stdout_empty()
        }

        /// Everything an operation could change: the store listings and the whole pool.
        fn state(&self) -> (Value, Value, Value) {
            let (v, s) = self.store();
            (v, s, pool_listing())
        }

        /// Writes `chunks` into volume `id`'s image head with `rbd import-diff`.
        fn write(&self, id: &str, chunks: &[(u64, &[u8])]) {
            let f = self.path(&format!("write-{}.diff", unique_token()));
            std::fs::write(&f, diff_file(chunks)).unwrap();
            rbd(&[
                "import-diff",
                "--no-progress",
                f.to_str().unwrap(),
                &format!("rbd/volume-{id}"),
            ]);
            std::fs::remove_file(&f).unwrap();
        }

        /// Reads volume `id`'s image head with `rbd export`.
        fn read_head(&self, id: &str) -> Vec<u8> {
            let f = self.path(&format!("head-{}.raw", unique_token()));
            rbd(&[
                "export",
                "--no-progress",
                &format!("rbd/volume-{id}"),
                f.to_str().unwrap(),
            ]);
            let data = std::fs::read(&f).unwrap();
            std::fs::remove_file(&f).unwrap();
            data
        }
    }

    #[test]
    fn rbd_lifecycle_through_the_cli_keeps_every_point_in_time() {
        let _g = serial();
        let k = Kiln::new();

        // The backend: rbd driver, default, the capabilities RBD promises, and pool capacity.
        let b = k.json(&["backend", "list"]);
        let rows = b.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{b}");
        let ceph = &rows[0];
        assert_eq!(ceph["name"], "ceph");
        assert_eq!(ceph["driver"], "rbd");
        assert_eq!(ceph["default"], true);
        for cap in [
            "thin",
            "online_snapshot",
            "revert_any",
            "clone",
            "clone_cow",
            "diff",
        ] {
            assert_eq!(ceph["capabilities"][cap], true, "capability {cap}: {ceph}");
        }
        // RBD's group snapshots are not used (docs/rbd-backend.md): no claim.
        assert_eq!(
            ceph["capabilities"]["group_snapshot"], false,
            "group_snapshot: {ceph}"
        );
        let total = ceph["stats"]["total_bytes"].as_u64().unwrap();
        let free = ceph["stats"]["free_bytes"].as_u64().unwrap();
        assert!(total > 0 && free > 0 && free <= total, "{ceph}");
        assert!(ceph["stats_error"].is_null(), "{ceph}");
        let table = k.run(&["backend", "list"]);
        assert!(table.status.success());
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(
            table.contains("ceph") && table.contains("clone-cow"),
            "{table}"
        );

        // A volume is an image named from its UUID only (the label never reaches Ceph).
        let v = k.json(&["volume", "create", "--size", "64M", "--name", "db disk"]);
        assert_eq!(v["status"], "available");
        assert_eq!(v["size_bytes"], SIZE);
        assert_eq!(v["backend"], "ceph");
        let vid = s(&v, "id");
        let vimg = format!("volume-{vid}");
        assert_eq!(s(&v, "provider_location"), format!("rbd/{vimg}"));
        let info = rbd_json(&["info", &format!("rbd/{vimg}")]);
        assert_eq!(info["size"], SIZE, "{info}");
        assert!(
            !rbd_images().iter().any(|n| n.contains("db disk")),
            "the label reached Ceph"
        );
        assert_eq!(k.json(&["volume", "show", &vid]), v);
        let list = k.json(&["volume", "list"]);
        assert_eq!(list.as_array().unwrap().len(), 1);
        assert_eq!(list[0]["id"], vid.as_str());

        // Generation 1: two chunks, the second straddling the 40 MiB object boundary.
        let (a1, b1) = (pattern(1, MIB as usize), pattern(2, 3 * MIB as usize / 2));
        let b_off = 39 * MIB + MIB / 2;
        k.write(&vid, &[(0, &a1), (b_off, &b1)]);
        let gen1 = image(SIZE, &[(0, &a1), (b_off, &b1)]);
        assert_same(&k.read_head(&vid), &gen1, "head after gen1 writes");
        let s1 = k.json(&["snapshot", "create", &vid, "--name", "gen1"]);
        assert_eq!(s1["volume_id"], vid.as_str());
        assert_eq!(s1["status"], "available");
        assert_eq!(s1["forced"], false);
        assert_eq!(s1["backend"], "ceph");
        let s1id = s(&s1, "id");
        assert_eq!(
            s(&s1, "provider_location"),
            format!("rbd/{vimg}@snapshot-{s1id}")
        );
        assert_eq!(k.json(&["snapshot", "show", &s1id]), s1);
        assert_eq!(rbd_snaps(&vimg), vec![format!("snapshot-{s1id}")]);

        // Generation 2 overwrites part of it; a second snapshot; then the head moves on.
        let a2 = pattern(3, MIB as usize);
        k.write(&vid, &[(MIB / 2, &a2)]);
        let gen2 = image(SIZE, &[(0, &a1), (b_off, &b1), (MIB / 2, &a2)]);
        let s2id = s(
            &k.json(&["snapshot", "create", &vid, "--name", "gen2"]),
            "id",
        );
        let a3 = pattern(4, 4 * MIB as usize);
        k.write(&vid, &[(0, &a3)]);
        let gen3 = image(SIZE, &[(0, &a1), (b_off, &b1), (MIB / 2, &a2), (0, &a3)]);
        assert_same(&k.read_head(&vid), &gen3, "head after gen3 writes");
        let mut want_snaps = vec![format!("snapshot-{s1id}"), format!("snapshot-{s2id}")];
        want_snaps.sort();
        assert_eq!(rbd_snaps(&vimg), want_snaps);

        // Export each snapshot: exact bytes, kiln's sha256 is the image's, holes skipped.
        let (data, e) = k.export(&s1id);
        assert_same(&data, &gen1, "export of gen1");
        assert_eq!(s(&e, "sha256"), sha256_hex(&gen1));
        assert_eq!(e["size_bytes"], SIZE);
        assert!(
            e["data_bytes_written"].as_u64().unwrap() < SIZE,
            "export was not sparse: {e}"
        );
        let (data, e) = k.export(&s2id);
        assert_same(&data, &gen2, "export of gen2");
        assert_eq!(s(&e, "sha256"), sha256_hex(&gen2));
        // To stdout: the image on stdout, the summary (with the same sha256) on stderr.
        let o = k.run(&["snapshot", "export", &s2id, "--output", "-"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_same(&o.stdout, &gen2, "export of gen2 to stdout");
        assert!(String::from_utf8_lossy(&o.stderr).contains(&sha256_hex(&gen2)));

        // Clone gen1 into a larger volume: a copy-on-write child of the snapshot.
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
        assert_eq!(c["size_bytes"], 2 * SIZE);
        assert_eq!(c["backend"], "ceph");
        assert_eq!(c["status"], "available");
        let cid = s(&c, "id");
        let cimg = format!("volume-{cid}");
        let cinfo = rbd_json(&["info", &format!("rbd/{cimg}")]);
        assert_eq!(cinfo["size"], 2 * SIZE, "{cinfo}");
        assert_eq!(cinfo["parent"]["image"], vimg.as_str(), "{cinfo}");
        assert_eq!(
            cinfo["parent"]["snapshot"],
            format!("snapshot-{s1id}").as_str(),
            "{cinfo}"
        );
        let want_clone = image(2 * SIZE, &[(0, &gen1)]);
        assert_same(&k.read_head(&cid), &want_clone, "clone head");
        // A write to the clone changes neither its origin's snapshot nor the origin.
        let e1 = pattern(5, MIB as usize);
        k.write(&cid, &[(100 * MIB, &e1)]);
        let want_clone = image(2 * SIZE, &[(0, &gen1), (100 * MIB, &e1)]);
        let cs = k.json(&["snapshot", "create", &cid, "--name", "clone-snap"]);
        let csid = s(&cs, "id");
        let (data, e) = k.export(&csid);
        assert_same(&data, &want_clone, "export of the clone's snapshot");
        assert_eq!(s(&e, "sha256"), sha256_hex(&want_clone));
        assert_same(&k.export(&s1id).0, &gen1, "gen1 after writing the clone");
        assert_same(&k.read_head(&vid), &gen3, "origin after writing the clone");

        // Revert to the OLDER snapshot: the head is gen1, both snapshots stay intact.
        let r = k.json(&["snapshot", "revert", &s1id]);
        assert_eq!(r["id"], vid.as_str());
        assert_eq!(r["status"], "available");
        assert_same(&k.read_head(&vid), &gen1, "head after revert to gen1");
        assert_eq!(rbd_snaps(&vimg), want_snaps);
        assert_same(&k.export(&s2id).0, &gen2, "gen2 after revert to gen1");
        // ... and forward again to the newer one.
        k.json(&["snapshot", "revert", &s2id]);
        assert_same(&k.read_head(&vid), &gen2, "head after revert to gen2");

        // Lineage: volume -> gen1 -> clone -> clone-snap; gen2 has no clones.
        let t = k.json(&["snapshot", "tree", &vid]);
        assert_eq!(t["volume"]["id"], vid.as_str());
        assert_eq!(t["snapshots"][0]["snapshot"]["id"], s1id.as_str());
        assert_eq!(t["snapshots"][0]["clones"][0]["volume"]["id"], cid.as_str());
        assert_eq!(
            t["snapshots"][0]["clones"][0]["snapshots"][0]["snapshot"]["id"],
            csid.as_str()
        );
        assert_eq!(t["snapshots"][1]["snapshot"]["id"], s2id.as_str());
        assert_eq!(t["snapshots"][1]["clones"], serde_json::json!([]));
        let text = k.run(&["snapshot", "tree", &vid]);
        assert!(text.status.success());
        assert!(String::from_utf8_lossy(&text.stdout).contains("gen1"));

        // Attached: a plain snapshot is refused (wrong state, nothing changes), --force works.
        let inst = "3f1c2a0e-8a4b-4c5d-9e6f-7a8b9c0d1e2f";
        let a = k.attach(&vid, inst, "/dev/vdb");
        assert_eq!(a["status"], "in-use");
        assert_eq!(a["attachments"][0]["instance_id"], inst);
        assert_eq!(a["attachments"][0]["device"], "/dev/vdb");
        let before = k.state();
        let msg = k.fails(&["snapshot", "create", &vid], 5);
        assert!(msg.contains("in-use") && msg.contains("--force"), "{msg}");
        assert_eq!(before, k.state(), "a refused snapshot changed something");
        let f = k.json(&["snapshot", "create", &vid, "--force", "--name", "online"]);
        assert_eq!(f["forced"], true);
        assert_eq!(f["status"], "available");
        let fid = s(&f, "id");
        assert!(rbd_snaps(&vimg).contains(&format!("snapshot-{fid}")));
        assert_same(
            &k.export(&fid).0,
            &gen2,
            "forced snapshot of the attached volume",
        );
        let snaps = k.json(&["snapshot", "list", "--volume", &vid]);
        assert_eq!(snaps.as_array().unwrap().len(), 3, "{snaps}");
        let d = k.json(&["volume", "detach", &vid]);
        assert_eq!(d["status"], "available");
        assert_eq!(d["attachments"], serde_json::json!([]));

        // gen1 has a clone: deleting it is "busy" naming the clone's volume, and nothing changes
        // (the snapshot only passes through `deleting` and back, which stamps updated_at).
        let before = k.state();
        let msg = k.fails(&["snapshot", "delete", &s1id], 6);
        assert!(
            msg.contains(&cid),
            "busy message does not name the clone: {msg}"
        );
        let after = k.state();
        assert_eq!(before.0, after.0, "volumes changed");
        assert_eq!(before.1, after.1, "snapshots changed");
        assert_eq!(before.2, after.2, "the pool changed");
        assert_eq!(k.json(&["snapshot", "show", &s1id])["status"], "available");

        // --flatten-dependents: the clone becomes independent and keeps its data.
        let del = k.json(&["snapshot", "delete", &s1id, "--flatten-dependents"]);
        assert_eq!(del["deleted"], true);
        k.fails(&["snapshot", "show", &s1id], 3);
        assert!(!rbd_snaps(&vimg).contains(&format!("snapshot-{s1id}")));
        let cinfo = rbd_json(&["info", &format!("rbd/{cimg}")]);
        assert!(
            cinfo.get("parent").is_none(),
            "clone still has a parent: {cinfo}"
        );
        assert_same(&k.read_head(&cid), &want_clone, "clone after flatten");
        assert_same(
            &k.export(&csid).0,
            &want_clone,
            "clone's snapshot after flatten",
        );
        assert_same(&k.export(&s2id).0, &gen2, "gen2 after deleting gen1");

        // Deletes: refused while snapshots exist; --cascade removes snapshots and image.
        let msg = k.fails(&["volume", "delete", &vid], 5);
        assert!(msg.contains("snapshot"), "{msg}");
        let del = k.json(&["volume", "delete", &vid, "--cascade"]);
        assert_eq!(del["deleted"], true);
        k.fails(&["volume", "show", &vid], 3);
        k.json(&["snapshot", "delete", &csid]);
        k.json(&["volume", "delete", &cid]);
        assert_eq!(k.store(), (serde_json::json!([]), serde_json::json!([])));
        let images = rbd_images();
        assert!(
            !images.contains(&vimg) && !images.contains(&cimg),
            "images left behind: {images:?}"
        );
    }

    #[test]
    fn bad_input_and_wrong_states_change_neither_store_nor_cluster() {
        let _g = serial();
        let k = Kiln::new();
        let v = k.json(&["volume", "create", "--size", "64M"]);
        let vid = s(&v, "id");
        let data = pattern(7, 2 * MIB as usize);
        k.write(&vid, &[(8 * MIB, &data)]);
        let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
        // A second volume, attached: in-use.
        let w = k.json(&["volume", "create", "--size", "64M", "--name", "attached"]);
        let wid = s(&w, "id");
        let wsid = s(&k.json(&["snapshot", "create", &wid]), "id");
        k.attach(&wid, "0b6f7c0e-1111-4222-8333-944455556666", "/dev/vdc");
        let exists = k.path("exists.raw");
        std::fs::write(&exists, b"precious").unwrap();
        let exists = exists.to_str().unwrap().to_string();
        let never = k.path("never.raw");
        let never = never.to_str().unwrap().to_string();
        let unknown = "6a1d2e3f-4b5c-4d6e-8f70-8192a3b4c5d6";
        let before = k.state();

        let cases: Vec<(Vec<&str>, i32)> = vec![
            // unknown ids: not found
            (vec!["volume", "show", unknown], 3),
            (vec!["volume", "delete", unknown], 3),
            (vec!["volume", "delete", unknown, "--cascade"], 3),
            (vec!["volume", "detach", unknown], 3),
            (vec!["volume", "create", "--snapshot", unknown], 3),
            (
                vec!["volume", "create", "--size", "8M", "--backend", "nope"],
                3,
            ),
            (vec!["snapshot", "create", unknown], 3),
            (vec!["snapshot", "create", unknown, "--force"], 3),
            (vec!["snapshot", "show", unknown], 3),
            (vec!["snapshot", "delete", unknown], 3),
            (
                vec!["snapshot", "delete", unknown, "--flatten-dependents"],
                3,
            ),
            (vec!["snapshot", "revert", unknown], 3),
            (vec!["snapshot", "tree", unknown], 3),
            (vec!["snapshot", "list", "--volume", unknown], 3),
            (vec!["snapshot", "export", unknown, "--output", &never], 3),
            (
                vec![
                    "bench",
                    "snapshot",
                    "--volume",
                    unknown,
                    "--iterations",
                    "1",
                ],
                3,
            ),
            // malformed input
            (vec!["volume", "create", "--size", "0"], 4),
            (vec!["volume", "create", "--size", "1.5G"], 4),
            (vec!["volume", "create", "--size", "65T"], 4),
            (vec!["volume", "create"], 4),
            (
                vec!["volume", "create", "--size", "8M", "--name", "$(reboot)"],
                4,
            ),
            (
                vec!["volume", "create", "--size", "8M", "--name", "../../x"],
                4,
            ),
            (
                vec!["volume", "create", "--snapshot", &sid, "--size", "32M"],
                4,
            ),
            (vec!["volume", "show", "not-a-uuid"], 4),
            (vec!["snapshot", "show", "volume-../x"], 4),
            (vec!["snapshot", "export", &sid, "--output", &exists], 4),
            (vec!["bench", "snapshot", "--iterations", "0"], 4),
            // wrong states
            (vec!["snapshot", "create", &wid], 5),
            (vec!["snapshot", "revert", &wsid], 5),
            (vec!["volume", "delete", &wid], 5),
            (vec!["volume", "delete", &wid, "--cascade"], 5),
            (vec!["volume", "delete", &vid], 5),
            (vec!["volume", "detach", &vid], 5),
        ];
        for (args, code) in &cases {
            k.fails(args, *code);
            assert_eq!(before, k.state(), "kiln {args:?} changed something");
        }
        assert_eq!(std::fs::read(&exists).unwrap(), b"precious");
        assert!(!Path::new(&never).exists());
        // The data is still there, through kiln and through rbd.
        let want = image(SIZE, &[(8 * MIB, &data)]);
        assert_same(&k.export(&sid).0, &want, "snapshot after the refusals");
        assert_same(&k.read_head(&vid), &want, "head after the refusals");
        // A bench on an attached volume takes forced snapshots, and leaves it as it was.
        let r = k.json(&["bench", "snapshot", "--volume", &wid, "--iterations", "1"]);
        assert!(r["create_ms"]["median"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(
            before,
            k.state(),
            "the bench on an attached volume changed it"
        );

        k.json(&["volume", "detach", &wid]);
        k.json(&["volume", "delete", &wid, "--cascade"]);
        k.json(&["volume", "delete", &vid, "--cascade"]);
        assert_eq!(k.store(), (serde_json::json!([]), serde_json::json!([])));
    }

    #[test]
    fn an_unreachable_cluster_is_listed_unavailable_and_fails_fast() {
        let _g = serial();
        let k = Kiln::new();
        // A port nothing listens on: bind, note it, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dead_conf = k.path("dead-ceph.conf");
        std::fs::write(
        &dead_conf,
        format!(
            "[global]\nmon host = v2:127.0.0.1:{port}\nauth cluster required = none\nauth service required = none\nauth client required = none\nlog file = {}\n",
            k.path("dead-client.log").display()
        ),
    )
    .unwrap();
        let config = k.path("with-down.toml");
        std::fs::write(
        &config,
        format!(
            "default_backend = \"ceph\"\n\n[backends.ceph]\ndriver = \"rbd\"\nceph_conf = {:?}\n\n[backends.down]\ndriver = \"rbd\"\nceph_conf = {:?}\nconnect_timeout_secs = 2\n",
            ceph_conf().to_str().unwrap(),
            dead_conf.to_str().unwrap()
        ),
    )
    .unwrap();
        let run = |args: &[&str]| run_bounded(k.cmd_with(&config, args), Duration::from_secs(60));

        // backend list: exit 0; ceph is fine, down is listed with the reason.
        let (out, _) = run(&["--format", "json", "backend", "list"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ceph = backend_row(&rows, "ceph");
        assert!(ceph["stats"]["total_bytes"].as_u64().unwrap() > 0, "{ceph}");
        let down = backend_row(&rows, "down");
        assert_eq!(down["driver"], "rbd", "{down}");
        assert_eq!(down["capabilities"]["snapshot_method"], "", "{down}");
        assert!(down["stats"].is_null(), "{down}");
        let reason = s(&down, "unavailable");
        assert!(reason.contains("cannot connect"), "{reason}");
        assert!(s(&down, "stats_error").contains("unavailable"), "{down}");
        let (table, _) = run(&["backend", "list"]);
        assert!(table.status.success());
        assert!(String::from_utf8_lossy(&table.stdout).contains("unavailable"));

        // An operation on it: backend failure (8), one line, bounded by the connect timeout.
        let before = k.state();
        let args = ["volume", "create", "--backend", "down", "--size", "8M"];
        let (out, took) = run(&args);
        let msg = check_failure(&args, &out, 8);
        assert!(msg.contains("unavailable"), "{msg}");
        eprintln!("volume create on the unreachable backend failed after {took:?}");
        // Fails fast: within the configured connect timeout (2 s) plus process start-up
        // and slack for a loaded machine, never by waiting for librados' own defaults
        // (minutes). A bound on "does not hang", not a performance threshold.
        assert!(
            took < std::time::Duration::from_secs(2 + 20),
            "took {took:?} with connect_timeout_secs = 2"
        );
        // Refused before the store was touched: no record, nothing on any cluster.
        assert_eq!(
            before,
            k.state(),
            "an operation on an unavailable backend changed something"
        );
        // The working backend is still usable from the same config.
        let (out, _) = run(&["--format", "json", "volume", "create", "--size", "8M"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["backend"], "ceph");
        k.json(&["volume", "delete", &s(&v, "id")]);
    }

    #[test]
    fn bench_snapshot_on_rbd_reports_kiln_primitive_and_cli_and_cleans_up() {
        let _g = serial();
        let k = Kiln::new();
        let before = k.state();
        let check = |r: &Value| {
            assert_bench_timings(r);
            assert!(
                s(r, "primitive").contains("rbd_snap_create"),
                "primitive: {r}"
            );
            let cmp = r["comparisons"].as_array().unwrap();
            assert!(
                cmp.iter()
                    .any(|c| c["name"].as_str().unwrap().contains("rbd")),
                "no rbd CLI comparison: {r}"
            );
            assert_eq!(r["iterations"], 3);
            assert!(r["create_ratio"].as_f64().unwrap() > 0.0);
        };
        let r = k.json(&[
            "bench",
            "snapshot",
            "--backend",
            "ceph",
            "--size",
            "64M",
            "--iterations",
            "3",
        ]);
        check(&r);
        assert_eq!(r["backend"], "ceph");
        assert_eq!(r["size_bytes"], SIZE);
        // The scratch volume and every bench snapshot are gone again.
        assert_eq!(before, k.state(), "the bench left something behind");

        // On a volume holding data and a snapshot: both are left exactly as they were.
        let v = k.json(&["volume", "create", "--size", "64M"]);
        let vid = s(&v, "id");
        let data = pattern(9, 3 * MIB as usize);
        k.write(&vid, &[(5 * MIB, &data)]);
        let sid = s(
            &k.json(&["snapshot", "create", &vid, "--name", "keep"]),
            "id",
        );
        let before = k.state();
        let r = k.json(&["bench", "snapshot", "--volume", &vid, "--iterations", "3"]);
        check(&r);
        assert_eq!(before, k.state(), "the bench on a volume changed it");
        let want = image(SIZE, &[(5 * MIB, &data)]);
        assert_same(&k.read_head(&vid), &want, "volume after the bench");
        assert_same(&k.export(&sid).0, &want, "snapshot after the bench");
        k.json(&["volume", "delete", &vid, "--cascade"]);
    }

    /// librbd and librados are loaded when an RBD backend is first used, not linked: a
    /// command that uses no RBD backend maps no Ceph library (it used to load 27 shared
    /// objects, ≈ 17 ms of CPU, before `main`). The loader's own trace (`LD_DEBUG=libs`)
    /// says what was mapped. No cluster needed.
    #[test]
    fn commands_without_an_rbd_backend_load_no_ceph_library() {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--version")
            .env("LD_DEBUG", "libs")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let trace = String::from_utf8_lossy(&out.stderr);
        // The trace is there at all (else the absence below would prove nothing).
        assert!(trace.contains("libc.so.6"), "no loader trace: {trace}");
        for lib in ["librbd", "librados", "libceph-common"] {
            assert!(!trace.contains(lib), "{lib} was loaded:\n{trace}");
        }
    }

    /// Interop with the real `rbd` CLI: streams `kiln snapshot diff` wrote — from an RBD
    /// snapshot, and from a qcow2 file snapshot — are applied by `rbd import-diff` onto a new
    /// RBD image: the full stream of a first snapshot, then the `--from` stream of a second
    /// (import-diff checks the image has the stream's from-snapshot). Each snapshot
    /// import-diff makes there (named by the stream) holds exactly the bytes `kiln snapshot
    /// export` gives; the RBD incremental reads only what changed.
    #[test]
    fn rbd_import_diff_applies_kiln_diff_streams_from_rbd_and_file_snapshots() {
        let _g = serial();
        let k = Kiln::new();
        let mut cfg = std::fs::read_to_string(&k.config).unwrap();
        cfg.push_str(
            "\n[backends.files]\ndriver = \"file\"\npath = \"files\"\nformat = \"qcow2\"\n",
        );
        std::fs::write(&k.config, cfg).unwrap();
        let data = pattern(9, 3 * MIB as usize);
        // An RBD volume, written through rbd.
        let r = s(&k.json(&["volume", "create", "--size", "64M"]), "id");
        k.write(&r, &[(5 * MIB, &data), (40 * MIB, &data[..4096])]);
        // A qcow2 file volume, written with qemu-io.
        let f = k.json(&["volume", "create", "--size", "64M", "--backend", "files"]);
        let fid = s(&f, "id");
        let vdir = k.data_dir().join("files").join(format!("volume-{fid}"));
        let chain: Value =
            serde_json::from_slice(&std::fs::read(vdir.join("chain.json")).unwrap()).unwrap();
        let active = vdir.join(chain["active"].as_str().unwrap());
        let src = k.path("chunk.bin");
        std::fs::write(&src, &data).unwrap();
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!(
                "write -s {} {} {}",
                src.display(),
                7 * MIB,
                data.len()
            ))
            .arg(&active)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let qemu_write = |off: u64, bytes: &[u8]| {
            std::fs::write(&src, bytes).unwrap();
            let out = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c"])
                .arg(format!("write -s {} {off} {}", src.display(), bytes.len()))
                .arg(&active)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for (vid, what) in [(r, "rbd"), (fid, "file")] {
            let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
            // The second snapshot: 64 KiB rewritten and 4 KiB zeroed.
            let (rewrite, zeros) = (pattern(10, 64 << 10), vec![0u8; 4096]);
            if what == "rbd" {
                k.write(&vid, &[(6 * MIB, &rewrite), (40 * MIB, &zeros)]);
            } else {
                qemu_write(6 * MIB, &rewrite);
                qemu_write(8 * MIB, &zeros);
            }
            let sid2 = s(&k.json(&["snapshot", "create", &vid]), "id");
            let image = format!("rbd/kiln-interop-{what}-{}", unique_token());
            rbd(&["create", "--size", "1M", &image]);
            for (snap, from) in [(&sid, None), (&sid2, Some(&sid))] {
                let (want, _) = k.export(snap);
                let stream = k.path(&format!("{what}-{snap}.diff"));
                let mut args = vec!["snapshot", "diff", snap.as_str()];
                if let Some(f) = from {
                    args.extend(["--from", f.as_str()]);
                }
                args.extend(["--output", stream.to_str().unwrap()]);
                let sum = k.json(&args);
                if from.is_some() && what == "rbd" {
                    let read = sum["read_bytes"].as_u64().unwrap();
                    assert!(read <= MIB, "the RBD incremental read {read} bytes: {sum}");
                }
                rbd(&[
                    "import-diff",
                    "--no-progress",
                    stream.to_str().unwrap(),
                    &image,
                ]);
                let got_file = k.path(&format!("{what}-{snap}.raw"));
                rbd(&[
                    "export",
                    "--no-progress",
                    &format!("{image}@{snap}"),
                    got_file.to_str().unwrap(),
                ]);
                let got = std::fs::read(&got_file).unwrap();
                assert_same(
                    &got,
                    &want,
                    &format!("rbd import-diff of the {what} snapshot's stream (from {from:?})"),
                );
            }
            rbd(&["snap", "purge", "--no-progress", &image]);
            rbd(&["rm", "--no-progress", &image]);
        }
    }

    /// Interop the other way: streams the real `rbd export-diff` wrote — the full stream of
    /// a first snapshot, then `--from-snap` the changes to a second — are applied by `kiln
    /// volume import-diff` onto a raw file volume and onto another RBD volume; each takes the
    /// streams' snapshots by name, and each snapshot reads exactly as `rbd export` of the
    /// original snapshot.
    #[test]
    fn kiln_import_diff_applies_rbd_export_diff_streams_onto_file_and_rbd_volumes() {
        let _g = serial();
        let k = Kiln::new();
        let mut cfg = std::fs::read_to_string(&k.config).unwrap();
        cfg.push_str("\n[backends.files]\ndriver = \"file\"\npath = \"files\"\n");
        std::fs::write(&k.config, cfg).unwrap();
        let src = s(&k.json(&["volume", "create", "--size", "32M"]), "id");
        let data = pattern(21, 5 * MIB as usize);
        k.write(&src, &[(MIB, &data), (30 * MIB, &data[..8192])]);
        let a = s(&k.json(&["snapshot", "create", &src]), "id");
        k.write(
            &src,
            &[(2 * MIB, &pattern(22, 65536)), (30 * MIB, &[0u8; 4096])],
        );
        let b = s(&k.json(&["snapshot", "create", &src]), "id");
        let image = format!("rbd/volume-{src}");
        let (sa, sb) = (format!("snapshot-{a}"), format!("snapshot-{b}"));
        let (full, inc) = (k.path("rbd-full.diff"), k.path("rbd-inc.diff"));
        rbd(&[
            "export-diff",
            "--no-progress",
            &format!("{image}@{sa}"),
            full.to_str().unwrap(),
        ]);
        rbd(&[
            "export-diff",
            "--no-progress",
            "--from-snap",
            &sa,
            &format!("{image}@{sb}"),
            inc.to_str().unwrap(),
        ]);
        for backend in ["files", "ceph"] {
            let dst = s(
                &k.json(&["volume", "create", "--size", "32M", "--backend", backend]),
                "id",
            );
            for (stream, orig, name) in [(&full, &a, &sa), (&inc, &b, &sb)] {
                let r = k.json(&[
                    "volume",
                    "import-diff",
                    &dst,
                    "--input",
                    stream.to_str().unwrap(),
                ]);
                assert_eq!(r["snapshot"]["name"], name.as_str(), "{backend}: {r}");
                let (want, _) = k.export(orig);
                let (got, _) = k.export(&s(&r["snapshot"], "id"));
                assert_same(
                    &got,
                    &want,
                    &format!("{backend}: kiln import-diff of rbd export-diff ({name})"),
                );
            }
        }
    }

    /// Backups of an RBD volume in a directory target: a full backup, then two incrementals
    /// after small rewrites and zeroed ranges, chained by `parent_id`; the incrementals read
    /// only the extents `rbd_diff_iterate2` reports as written since the base (exact
    /// extents, not whole 4 MiB objects). Each backup verifies, and restores onto a raw file
    /// volume, onto a new RBD volume, and over an existing RBD volume holding other data
    /// (forwards to the newest, then back to the oldest); a raw file volume's full and
    /// incremental backups restore onto RBD. Every restored volume, snapshotted and exported,
    /// equals the backed-up snapshot's export byte for byte, and that export equals the image
    /// the test wrote.
    #[test]
    fn rbd_backups_full_and_incremental_restore_onto_file_and_back() {
        let _g = serial();
        let k = Kiln::new();
        let mut cfg = std::fs::read_to_string(&k.config).unwrap();
        // Raw files; the test directory may be on a filesystem without reflink.
        cfg.push_str(
            "\n[backends.files]\ndriver = \"file\"\npath = \"files\"\nformat = \"raw\"\n\
             allow_full_copy = true\n",
        );
        std::fs::write(&k.config, cfg).unwrap();
        let dir = k.path("backups");
        std::fs::create_dir(&dir).unwrap();
        let target = format!("dir:{}", dir.display());
        let backup = |vid: &str, incremental: bool| {
            let mut args = vec!["backup", "create", vid, "--target", target.as_str()];
            if incremental {
                args.push("--incremental");
            }
            k.json(&args)
        };
        let u = |v: &Value, key: &str| {
            v["stream"][key]
                .as_u64()
                .unwrap_or_else(|| panic!("no stream.{key} in {v}"))
        };
        // `b` verifies: every chunk and the stream's records, which carry what the create said.
        let verify = |b: &Value| {
            let v = k.json(&["backup", "verify", &s(b, "id")]);
            assert_eq!(v["backup_id"], b["id"], "{v}");
            assert!(v["chunks"].as_u64().unwrap() >= 1, "{v}");
            assert_eq!(v["data_bytes"], b["stream"]["data_bytes"], "{v} vs {b}");
            assert_eq!(v["zero_bytes"], b["stream"]["zero_bytes"], "{v} vs {b}");
        };
        // Volume `r`, just restored from backup `b`, holds exactly `b`'s snapshot, whose
        // data is `want`: compared through a snapshot of `r` and both exports.
        let assert_restored = |r: &Value, b: &Value, want: &[u8], what: &str| {
            assert_eq!(r["status"], "available", "{what}: {r}");
            assert_eq!(r["size_bytes"], SIZE, "{what}: {r}");
            let (orig, _) = k.export(&s(b, "snapshot_id"));
            assert_same(&orig, want, &format!("{what}: the backed-up snapshot"));
            let snap = s(&k.json(&["snapshot", "create", &s(r, "id")]), "id");
            let (got, _) = k.export(&snap);
            assert_same(&got, &orig, what);
            k.json(&["snapshot", "delete", &snap]);
        };
        let put = |img: &mut Vec<u8>, chunks: &[(u64, &[u8])]| {
            for (off, data) in chunks {
                img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        };

        // The RBD volume: 8 MiB at 0, 3 MiB straddling the 20/24 MiB objects, 4 KiB at 60 MiB.
        let vid = s(&k.json(&["volume", "create", "--size", "64M"]), "id");
        let (a, b, c) = (
            pattern(31, 8 * MIB as usize),
            pattern(32, 3 * MIB as usize),
            pattern(33, 4096),
        );
        let gen1_writes: [(u64, &[u8]); 3] = [(0, &a), (20 * MIB + MIB / 2, &b), (60 * MIB, &c)];
        k.write(&vid, &gen1_writes);
        let gen1 = image(SIZE, &gen1_writes);
        assert_same(&k.read_head(&vid), &gen1, "head after gen1 writes");
        let b1 = backup(&vid, false);
        assert_eq!(b1["parent_id"], Value::Null, "{b1}");
        let data1 = 11 * MIB + 4096;
        assert!(u(&b1, "read_bytes") >= data1, "{b1}");
        assert!(u(&b1, "data_bytes") >= data1, "{b1}");
        assert!(b1["stored_bytes"].as_u64().unwrap() >= data1, "{b1}");

        // Gen 2: 64 KiB rewritten, 128 KiB inside the 3 MiB zeroed: 192 KiB changed.
        let (rewrite2, zeros2) = (pattern(34, 64 << 10), vec![0u8; 128 << 10]);
        let gen2_writes: [(u64, &[u8]); 2] = [(2 * MIB, &rewrite2), (21 * MIB, &zeros2)];
        k.write(&vid, &gen2_writes);
        let mut gen2 = gen1.clone();
        put(&mut gen2, &gen2_writes);
        assert_same(&k.read_head(&vid), &gen2, "head after gen2 writes");
        let b2 = backup(&vid, true);

        // Gen 3: 64 KiB into an object never written before, the 4 KiB at 60 MiB zeroed,
        // 8 KiB zeroed inside the first 8 MiB: 76 KiB changed.
        let (new3, zeros3) = (pattern(35, 64 << 10), vec![0u8; 8192]);
        let gen3_writes: [(u64, &[u8]); 3] = [
            (40 * MIB + 4096, &new3),
            (60 * MIB, &zeros3[..4096]),
            (MIB, &zeros3),
        ];
        k.write(&vid, &gen3_writes);
        let mut gen3 = gen2.clone();
        put(&mut gen3, &gen3_writes);
        assert_same(&k.read_head(&vid), &gen3, "head after gen3 writes");
        let b3 = backup(&vid, true);

        assert_eq!(b2["parent_id"], b1["id"], "{b2}");
        assert_eq!(b3["parent_id"], b2["id"], "{b3}");
        for b in [&b1, &b2, &b3] {
            assert_eq!(b["status"], "available", "{b}");
            assert_eq!(b["volume_id"], vid.as_str(), "{b}");
            assert_eq!(b["target"], target.as_str(), "{b}");
            assert_eq!(b["size_bytes"], SIZE, "{b}");
            assert!(
                dir.join(format!("kiln-backup-{}", s(b, "id"))).is_dir(),
                "{b}"
            );
        }
        let snaps: Vec<String> = [&b1, &b2, &b3]
            .iter()
            .map(|b| s(b, "snapshot_id"))
            .collect();
        assert!(snaps[0] != snaps[1] && snaps[1] != snaps[2], "{snaps:?}");
        // Only the extents written since the base are read (a whole-object diff would read
        // 4 MiB per touched object: 8 MiB for b2, 12 MiB for b3), and little is stored.
        for (b, data, zeros) in [(&b2, 64u64 << 10, 128u64 << 10), (&b3, 64 << 10, 12 << 10)] {
            let read = u(b, "read_bytes");
            eprintln!(
                "incremental {}: read {read} bytes, data {}, zeros {}, stored {}",
                s(b, "id"),
                u(b, "data_bytes"),
                u(b, "zero_bytes"),
                b["stored_bytes"]
            );
            assert!(read >= data + zeros && read <= MIB, "read {read}: {b}");
            assert!(
                u(b, "data_bytes") >= data && u(b, "data_bytes") <= MIB,
                "{b}"
            );
            assert!(
                u(b, "zero_bytes") >= zeros && u(b, "zero_bytes") <= MIB,
                "{b}"
            );
            assert!(b["stored_bytes"].as_u64().unwrap() <= MIB + 4096, "{b}");
        }
        let listed = k.json(&["backup", "list", "--volume", &vid]);
        assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");

        // Each backup verifies and restores onto a raw file volume and a new RBD volume.
        for (b, want) in [(&b1, &gen1), (&b2, &gen2), (&b3, &gen3)] {
            verify(b);
            let bid = s(b, "id");
            let r = k.json(&["backup", "restore", &bid, "--backend", "files"]);
            assert_eq!(r["backend"], "files", "{r}");
            let rid = s(&r, "id");
            let file = k.data_dir().join("files").join(format!("volume-{rid}"));
            assert_eq!(std::fs::metadata(&file).unwrap().len(), SIZE, "{r}");
            assert_restored(
                &r,
                b,
                want,
                &format!("backup {bid} restored onto a raw file"),
            );
            k.json(&["volume", "delete", &rid]);

            let r = k.json(&["backup", "restore", &bid, "--backend", "ceph"]);
            assert_eq!(r["backend"], "ceph", "{r}");
            let rid = s(&r, "id");
            assert_eq!(s(&r, "provider_location"), format!("rbd/volume-{rid}"));
            assert_eq!(
                rbd_json(&["info", &format!("rbd/volume-{rid}")])["size"],
                SIZE
            );
            assert_restored(&r, b, want, &format!("backup {bid} restored onto RBD"));
            k.json(&["volume", "delete", &rid]);
        }

        // Over an existing RBD volume holding other data everywhere: the newest backup, then
        // back to the oldest (gen 3's data at 40 MiB must be gone again).
        let over = s(&k.json(&["volume", "create", "--size", "64M"]), "id");
        let other = pattern(39, SIZE as usize);
        k.write(&over, &[(0, &other)]);
        for (b, want) in [(&b3, &gen3), (&b1, &gen1)] {
            let r = k.json(&["backup", "restore", &s(b, "id"), "--volume", &over]);
            assert_eq!(r["id"], over.as_str(), "{r}");
            assert_restored(
                &r,
                b,
                want,
                &format!("backup {} restored over an RBD volume", s(b, "id")),
            );
        }
        assert_same(
            &k.read_head(&over),
            &gen1,
            "head of the volume restored over",
        );

        // A raw file volume: a full backup and an incremental (no block tracking on full
        // copies: both snapshots are read and compared), each restored onto RBD.
        let fid = s(
            &k.json(&["volume", "create", "--size", "64M", "--backend", "files"]),
            "id",
        );
        let fpath = k.data_dir().join("files").join(format!("volume-{fid}"));
        let (fa, fb) = (pattern(41, 5 * MIB as usize), pattern(42, 64 << 10));
        write_at(&fpath, 3 * MIB, &fa);
        write_at(&fpath, 50 * MIB, &fb);
        let fgen1 = image(SIZE, &[(3 * MIB, &fa), (50 * MIB, &fb)]);
        let fb1 = backup(&fid, false);
        assert_eq!(fb1["parent_id"], Value::Null, "{fb1}");
        let frewrite = pattern(43, 64 << 10);
        write_at(&fpath, 4 * MIB, &frewrite);
        write_at(&fpath, 50 * MIB, &vec![0u8; 64 << 10]);
        let mut fgen2 = fgen1.clone();
        put(
            &mut fgen2,
            &[(4 * MIB, &frewrite), (50 * MIB, &[0u8; 64 << 10])],
        );
        let fb2 = backup(&fid, true);
        assert_eq!(fb2["parent_id"], fb1["id"], "{fb2}");
        assert!(u(&fb2, "data_bytes") <= MIB, "{fb2}");
        assert!(u(&fb2, "zero_bytes") >= 64 << 10, "{fb2}");
        for (b, want) in [(&fb1, &fgen1), (&fb2, &fgen2)] {
            verify(b);
            let r = k.json(&["backup", "restore", &s(b, "id"), "--backend", "ceph"]);
            assert_eq!(r["backend"], "ceph", "{r}");
            assert_restored(
                &r,
                b,
                want,
                &format!("file backup {} restored onto RBD", s(b, "id")),
            );
            k.json(&["volume", "delete", &s(&r, "id")]);
        }

        // Newest first, every backup goes; then the volumes and their snapshots.
        for b in [&b3, &b2, &b1, &fb2, &fb1] {
            k.json(&["backup", "delete", &s(b, "id")]);
        }
        assert_eq!(k.json(&["backup", "list"]), Value::Array(vec![]));
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "files left in the target"
        );
        for v in [&vid, &over, &fid] {
            k.json(&["volume", "delete", v, "--cascade"]);
        }
        assert_eq!(k.store(), (serde_json::json!([]), serde_json::json!([])));
        let images = rbd_images();
        assert!(
            ![&vid, &over]
                .iter()
                .any(|v| images.contains(&format!("volume-{v}"))),
            "images left behind: {images:?}"
        );
    }
}
