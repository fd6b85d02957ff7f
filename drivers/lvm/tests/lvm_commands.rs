//! What each LVM driver call runs, from its debug log, inside the user-mode-Linux guest: one
//! lvm command per create and delete unless it fails, a health probe that never activates
//! anything, the stderr of successful commands logged at debug. Run with
//! `tests/harness/lvm-suite.sh`.

mod support;

use kiln_core::{BlockingDriver, DeleteAction, ErrorKind, VolumeDriver};
use support::*;

/// Create and delete run their one lvm command; only when it fails does one `lvs` look
/// (a re-run finding its work done, a missing volume, a name clash).
async fn one_command(thin: bool) {
    let t = TestVg::new(if thin { "one-thin" } else { "one-thick" }, thin, 512);
    // Thick: the defaults, COW zeroing on delete included.
    let d = driver(&t).await;
    let b: &kiln_driver_lvm::LvmBackend = &d;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let s = snapshot(&v);
    let slv = format!("_snapshot-{}", s.id);

    let (r, ev) = capture(|| BlockingDriver::create_snapshot(b, &s, &v));
    assert_eq!(Some(r.unwrap()), loc(&t, &slv));
    assert_eq!(commands(&ev), ["lvcreate"], "create: {ev:?}");
    // A re-run, as after a crash before the store recorded the snapshot.
    let (r, ev) = capture(|| BlockingDriver::create_snapshot(b, &s, &v));
    assert_eq!(Some(r.unwrap()), loc(&t, &slv), "a re-run succeeds");
    assert_eq!(commands(&ev), ["lvcreate", "lvs"], "re-run: {ev:?}");

    let before = t.lv_state();
    let ghost_v = volume(VOL);
    let (r, ev) = capture(|| BlockingDriver::create_snapshot(b, &snapshot(&ghost_v), &ghost_v));
    assert_eq!(r.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(commands(&ev), ["lvcreate", "lvs"], "missing volume: {ev:?}");
    // The snapshot's name taken by a snapshot of another volume: refused, nothing changed.
    let other = volume(VOL);
    d.create_volume(&other).await.unwrap();
    let clash = snapshot(&v);
    let clash_lv = format!("_snapshot-{}", clash.id);
    let other_spec = format!("{}/volume-{}", t.vg, other.id);
    if thin {
        run(&["lvcreate", "-q", "-s", "-ky", "-n", &clash_lv, &other_spec]);
    } else {
        run(&[
            "lvcreate",
            "-q",
            "-s",
            "-L",
            "8m",
            "-n",
            &clash_lv,
            &other_spec,
        ]);
    }
    let before_clash = t.lv_state();
    let e = d.create_snapshot(&clash, &v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.message().contains("already exists"), "{e}");
    assert_eq!(
        t.lv_state(),
        before_clash,
        "a refused create changed the VG"
    );
    run(&["lvremove", "-q", "-f", &format!("{}/{clash_lv}", t.vg)]);
    d.delete_volume(&other).await.unwrap();
    assert_eq!(t.lv_state(), before, "failed creates changed the VG");

    let (r, ev) = capture(|| BlockingDriver::delete_snapshot(b, &s));
    assert_eq!(r.unwrap(), DeleteAction::Deleted);
    assert_eq!(commands(&ev), ["lvremove"], "delete: {ev:?}");
    let (r, ev) = capture(|| BlockingDriver::delete_snapshot(b, &s));
    assert_eq!(r.unwrap(), DeleteAction::AlreadyGone);
    if thin {
        assert_eq!(
            commands(&ev),
            ["lvremove", "lvs"],
            "repeated delete: {ev:?}"
        );
    } else {
        // Zeroing comes first: its COW device is missing, one lvs says the snapshot is gone.
        assert_eq!(commands(&ev), ["lvs"], "repeated delete: {ev:?}");
    }
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn thin_snapshot_create_and_delete_run_one_lvm_command_unless_it_fails() {
    one_command(true).await;
}

#[tokio::test]
async fn thick_snapshot_create_and_delete_run_one_lvm_command_unless_it_fails() {
    one_command(false).await;
}

#[tokio::test]
async fn snapshot_health_runs_one_lvs_of_that_snapshot_and_never_activates() {
    let t = TestVg::new("health", false, 512);
    let d = driver(&t).await;
    let b: &kiln_driver_lvm::LvmBackend = &d;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 4 << 20, 1);
    let s1 = snapshot(&v);
    d.create_snapshot(&s1, &v).await.unwrap();
    let vlv = format!("volume-{}", v.id);
    let s1lv = format!("_snapshot-{}", s1.id);

    let (r, ev) = capture(|| BlockingDriver::snapshot_health(b, &s1));
    assert_eq!(r.unwrap(), None);
    assert_eq!(commands(&ev), ["lvs"], "{ev:?}");
    let lvs = ev.iter().find(|e| e.command().is_some()).unwrap();
    assert!(
        lvs.fields
            .contains(&format!("\"-S\", \"lv_name=\\\"{s1lv}\\\"\"")),
        "selects that one LV: {lvs:?}"
    );
    assert!(
        lvs.fields
            .contains("\"lv_name,lv_attr,lv_size,origin,lv_snapshot_invalid\""),
        "only the fields it reads: {lvs:?}"
    );

    // An inactive volume (its snapshots' tables live and die with it).
    run(&["lvchange", "-q", "-an", &format!("{}/{vlv}", t.vg)]);
    let inactive = |lv: &str| t.attr(lv).chars().nth(4) == Some('-');
    assert!(inactive(&vlv) && inactive(&s1lv));
    let (r, ev) = capture(|| BlockingDriver::snapshot_health(b, &s1));
    assert_eq!(r.unwrap(), None, "an inactive snapshot cannot be judged");
    assert_eq!(commands(&ev), ["lvs"], "{ev:?}");
    assert!(
        inactive(&vlv) && inactive(&s1lv),
        "the probe activated something: {} / {}",
        t.attr(&vlv),
        t.attr(&s1lv)
    );

    // A snapshot of the inactive volume is made inactive, reads (the reader activates and
    // deactivates again) and deletes (the COW zeroing activates it).
    let s2 = snapshot(&v);
    let (r, ev) = capture(|| BlockingDriver::create_snapshot(b, &s2, &v));
    r.unwrap();
    assert_eq!(commands(&ev), ["lvcreate"], "{ev:?}");
    let s2lv = format!("_snapshot-{}", s2.id);
    assert!(inactive(&s2lv), "{}", t.attr(&s2lv));
    assert_snapshot(
        d.open_snapshot_reader(&s2).await.unwrap(),
        &img,
        "snapshot of an inactive volume",
    );
    assert!(
        inactive(&vlv) && inactive(&s2lv),
        "left active by the reader"
    );
    assert_eq!(d.delete_snapshot(&s2).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s1).await.unwrap(), DeleteAction::Deleted);
    let ghost = snapshot(&v);
    assert_eq!(
        d.snapshot_health(&ghost).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn successful_commands_stderr_is_logged_at_debug_never_warn() {
    let t = TestVg::new("quiet", true, 512);
    let d = driver(&t).await;
    let b: &kiln_driver_lvm::LvmBackend = &d;
    // 1 GiB in a 384 MiB pool: lvm warns about over-provisioning ("WARNING: Sum of all
    // thin volume sizes ...") on stderr of a command that succeeds.
    let v = volume(1024 * MIB);
    let (r, ev) = capture(|| BlockingDriver::create_volume(b, &v));
    r.unwrap();
    let notes: Vec<&Captured> = ev
        .iter()
        .filter(|e| e.message.starts_with("lvm: "))
        .collect();
    assert!(
        notes
            .iter()
            .any(|e| e.message.contains("WARNING: Sum of all thin volume sizes")),
        "lvcreate's stderr is logged: {ev:?}"
    );
    assert!(
        notes.iter().all(|e| e.level == tracing::Level::DEBUG),
        "{notes:?}"
    );
    let loud: Vec<&Captured> = ev
        .iter()
        .filter(|e| e.level <= tracing::Level::WARN)
        .collect();
    assert!(loud.is_empty(), "logged at warn or error: {loud:?}");
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}
