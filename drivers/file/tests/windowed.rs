//! The two-step snapshot instance snapshots use inside a freeze window, on a real XFS with
//! reflink: the cut alone fixes the point in time; finish makes it a durable snapshot after
//! the thaw; a cut that is never finished is removed by an ordinary delete. Only raw+reflink
//! offers it.

mod common;

use std::path::Path;

use common::{Env, MIB, Vol, check_snapshot, listing, snapshot};
use kiln_core::{DeleteAction, VolumeDriver};

const SIZE: u64 = 32 * MIB;

#[tokio::test]
async fn a_cut_fixes_the_point_in_time_and_finish_makes_it_a_snapshot() {
    let env = Env::raw().await;
    let w = env
        .driver
        .windowed()
        .expect("raw+reflink offers two-step snapshots");
    let mut a = Vol::create(&env, SIZE).await;
    let mut b = Vol::create(&env, SIZE).await;
    a.scatter(&env, 1).await;
    b.scatter(&env, 2).await;
    let (at_a, at_b) = (a.img.clone(), b.img.clone());
    let members = vec![
        (snapshot(&a.v), a.v.clone(), None),
        (snapshot(&b.v), b.v.clone(), None),
    ];
    let m = members.clone();
    let w2 = w.clone();
    let cut = tokio::task::spawn_blocking(move || w2.cut(&m))
        .await
        .unwrap();
    assert!(cut.iter().all(Result::is_ok), "{cut:?}");
    // Not a snapshot yet: recovery would find none (and roll the cut back).
    for (s, _, _) in &members {
        assert_eq!(env.driver.lookup_snapshot(s).await.unwrap(), None);
    }
    // Writes after the cut (the guest thawed) must not reach the snapshots.
    a.scatter(&env, 3).await;
    b.scatter(&env, 4).await;
    let m = members.clone();
    let done = tokio::task::spawn_blocking(move || w.finish(&m))
        .await
        .unwrap();
    for ((s, _, _), r) in members.iter().zip(&done) {
        let up = r.as_ref().unwrap();
        assert_eq!(
            env.driver.lookup_snapshot(s).await.unwrap().as_ref(),
            Some(up)
        );
    }
    check_snapshot(&env.driver, &members[0].0, &at_a).await;
    check_snapshot(&env.driver, &members[1].0, &at_b).await;
    a.check(&env).await;
    b.check(&env).await;
}

#[tokio::test]
async fn a_cut_never_finished_is_removed_by_delete_and_leaves_nothing() {
    let env = Env::raw().await;
    let w = env.driver.windowed().unwrap();
    let a = Vol::create(&env, SIZE).await;
    let loc = env.driver.lookup_volume(&a.v).await.unwrap().unwrap();
    let dir = Path::new(loc.provider_location.as_deref().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let before = listing(&dir);
    let s = snapshot(&a.v);
    let m = vec![(s.clone(), a.v.clone(), None)];
    let cut = tokio::task::spawn_blocking(move || w.cut(&m))
        .await
        .unwrap();
    assert!(cut[0].is_ok());
    assert_ne!(listing(&dir), before, "the cut is a file under a temp name");
    // A crash here: recovery's rollback deletes the member.
    assert_eq!(
        env.driver.delete_snapshot(&s).await.unwrap(),
        DeleteAction::AlreadyGone
    );
    assert_eq!(listing(&dir), before);
}

#[tokio::test]
async fn only_raw_reflink_offers_two_step_snapshots() {
    assert!(Env::qcow2().await.driver.windowed().is_none());
    assert!(Env::raw_full_copy().await.driver.windowed().is_none());
}
