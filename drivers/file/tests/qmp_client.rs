//! kiln's QMP client against a real `qemu-storage-daemon`: the monitor it reaches for the
//! online qcow2 snapshots of this backend. What a non-QMP socket, a dead daemon and a QMP
//! error look like, and the `blockdev-add` + `transaction` sequence those snapshots use, with
//! a guest writing through NBD.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_core::ErrorKind;
use kiln_core::hypervisor::qmp::Qmp;
use kiln_testkit::nbd::NbdClient;
use kiln_testkit::qsd::{Disk, Qsd};

const LIMIT: Duration = Duration::from_secs(30);

fn qcow2(path: &Path, backing: Option<&Path>) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        c.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    c.arg(path);
    if backing.is_none() {
        c.arg("16M");
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_socket_that_is_not_qmp_and_a_dead_daemon_are_one_line_unavailable_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A unix socket that accepts and says nothing.
    let quiet = dir.path().join("quiet.sock");
    let _l = std::os::unix::net::UnixListener::bind(&quiet).unwrap();
    let e = Qmp::connect(quiet.to_str().unwrap(), Duration::from_millis(300))
        .err()
        .expect("a silent socket is no monitor");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("no QMP greeting"), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");

    let img = dir.path().join("a.qcow2");
    qcow2(&img, None);
    let mut qsd = Qsd::start(
        &dir.path().join("qsd"),
        &[Disk {
            node: "a",
            path: &img,
        }],
    );
    let sock = qsd.qmp_path();
    qsd.kill();
    let e = Qmp::connect(sock.to_str().unwrap(), LIMIT)
        .err()
        .expect("a dead daemon");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains(sock.to_str().unwrap()), "{e}");
}

#[test]
fn nodes_errors_and_a_two_disk_transaction_while_the_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    qcow2(&a, None);
    qcow2(&b, None);
    let qsd = Qsd::start(
        &dir.path().join("qsd"),
        &[
            Disk {
                node: "a",
                path: &a,
            },
            Disk {
                node: "b",
                path: &b,
            },
        ],
    );
    let mut q = Qmp::connect(qsd.qmp_path().to_str().unwrap(), LIMIT).unwrap();
    let nodes = q.block_nodes().unwrap();
    let top = |nodes: &[kiln_core::hypervisor::qmp::BlockNode], f: &Path| {
        nodes
            .iter()
            .find(|n| n.driver == "qcow2" && Path::new(&n.file) == f)
            .map(|n| n.node_name.clone())
    };
    assert_eq!(top(&nodes, &a).as_deref(), Some("a"), "{nodes:?}");
    assert_eq!(top(&nodes, &b).as_deref(), Some("b"), "{nodes:?}");

    let e = q.delete_node("no-such-node").expect_err("unknown node");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("blockdev-del"), "{e}");

    let mut guest_a = NbdClient::connect(&qsd.nbd_path(), "a").unwrap();
    let mut guest_b = NbdClient::connect(&qsd.nbd_path(), "b").unwrap();
    guest_a.write_at(0, &[1u8; 4096]).unwrap();
    guest_b.write_at(0, &[1u8; 4096]).unwrap();

    let (oa, ob) = (dir.path().join("a.1.qcow2"), dir.path().join("b.1.qcow2"));
    qcow2(&oa, Some(&a));
    qcow2(&ob, Some(&b));
    q.add_overlay("a1", &oa).unwrap();
    q.add_overlay("b1", &ob).unwrap();
    q.snapshot_transaction(&[("a".into(), "a1".into()), ("b".into(), "b1".into())])
        .unwrap();
    let nodes = q.block_nodes().unwrap();
    assert_eq!(top(&nodes, &oa).as_deref(), Some("a1"));
    let a_node = nodes.iter().find(|n| n.node_name == "a").unwrap();
    assert!(a_node.read_only, "the old top is a read-only backing now");

    // The same connections write on, into the overlays.
    guest_a.write_at(0, &[2u8; 4096]).unwrap();
    guest_b.write_at(0, &[2u8; 4096]).unwrap();
    guest_a.flush().unwrap();
    let mut buf = [0u8; 4096];
    guest_a.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [2u8; 4096]);
    // The frozen base holds the old data; qemu-img may read it without -U.
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read -P 1 0 4096"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("read 4096/4096"));

    // A transaction whose second action fails changes nothing.
    let oa2 = dir.path().join("a.2.qcow2");
    qcow2(&oa2, Some(&oa));
    q.add_overlay("a2", &oa2).unwrap();
    let e = q
        .snapshot_transaction(&[("a1".into(), "a2".into()), ("b1".into(), "nope".into())])
        .expect_err("unknown overlay");
    assert!(e.to_string().contains("transaction"), "{e}");
    assert_eq!(top(&q.block_nodes().unwrap(), &oa).as_deref(), Some("a1"));
    q.delete_node("a2").unwrap();
}
