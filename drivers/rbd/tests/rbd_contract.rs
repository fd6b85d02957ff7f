//! The driver contract suite (`kiln_testkit::contract`) on the RBD backend, against the real
//! cluster named by `CEPH_CONF`.
//!
//! The suite compares the backend's whole object listing before and after refused calls;
//! on RBD that listing is the pool's, shared by every case, so the cases of this file run
//! one at a time (each target holds the file's lock while it lives).

mod common;

use std::sync::{Arc, LazyLock};

use common::{ceph_conf, config, rbd_cli};
use kiln_core::{Volume, VolumeDriver};
use kiln_driver_rbd::image::Image;
use kiln_driver_rbd::{RbdDriver, volume_image};
use kiln_testkit::contract::Target;
use tokio::sync::{Mutex, OwnedMutexGuard};

static SERIAL: LazyLock<Arc<Mutex<()>>> = LazyLock::new(|| Arc::new(Mutex::new(())));

/// The RBD backend under the contract suite.
struct RbdTarget {
    driver: RbdDriver,
    _serial: OwnedMutexGuard<()>,
}

async fn target() -> Arc<RbdTarget> {
    let serial = Arc::clone(&SERIAL).lock_owned().await;
    let driver = kiln_driver_rbd::open("rbd-test", config())
        .await
        .unwrap_or_else(|e| panic!("cannot open the RBD backend on {:?}: {e}", ceph_conf()));
    Arc::new(RbdTarget {
        driver,
        _serial: serial,
    })
}

impl Target for RbdTarget {
    fn driver(&self) -> Arc<dyn VolumeDriver> {
        Arc::new(self.driver.clone())
    }

    fn backend(&self) -> String {
        "rbd-test".into()
    }

    /// As a guest would: through its own read-write handle (which takes the exclusive lock
    /// from the driver's cached handle, as a VM does), flushed before returning.
    fn write(&self, v: &Volume, offset: u64, data: &[u8]) {
        let img = Image::open(self.driver.cluster(), &volume_image(&v.id), None).unwrap();
        img.write(offset, data).unwrap();
        img.flush().unwrap();
    }

    /// Every image and snapshot in the pool, and the pool's trash, per the `rbd` CLI.
    fn objects(&self) -> Vec<String> {
        let ls: serde_json::Value =
            serde_json::from_str(&rbd_cli(&["ls", "-l", "--format", "json", "rbd"])).unwrap();
        let trash: serde_json::Value =
            serde_json::from_str(&rbd_cli(&["trash", "ls", "--format", "json", "rbd"])).unwrap();
        let mut out: Vec<String> = ls
            .as_array()
            .unwrap()
            .iter()
            .map(|e| match e["snapshot"].as_str() {
                Some(s) => format!("{}@{s}", e["image"].as_str().unwrap()),
                None => e["image"].as_str().unwrap().to_string(),
            })
            .chain(
                trash
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| format!("trash:{}", e["name"].as_str().unwrap())),
            )
            .collect();
        out.sort();
        out
    }
}

kiln_testkit::contract_tests!(target().await);
