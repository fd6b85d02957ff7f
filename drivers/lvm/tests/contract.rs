//! The driver contract suite (`kiln_testkit::contract`) on real LVM, thin and thick, inside
//! the user-mode-Linux guest (run with `tests/harness/lvm-suite.sh`; one guest boot for this
//! whole binary). Each case gets a volume group of its own on a loop device.

mod support;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use kiln_core::{Volume, VolumeDriver};
use kiln_driver_lvm::{LvmDriver, open};
use kiln_testkit::contract::Target;
use support::TestVg;

/// An LVM backend under the contract suite.
struct LvmTarget {
    vg: TestVg,
    driver: LvmDriver,
}

async fn target(thin: bool) -> Arc<LvmTarget> {
    let vg = TestVg::new(if thin { "ct-thin" } else { "ct-thick" }, thin, 256);
    let driver = open("lvm-contract", vg.config()).await.unwrap();
    Arc::new(LvmTarget { vg, driver })
}

impl Target for LvmTarget {
    fn driver(&self) -> Arc<dyn VolumeDriver> {
        Arc::new(self.driver.clone())
    }

    fn backend(&self) -> String {
        "lvm-contract".into()
    }

    /// Writes through the volume's device node, as a guest's block device would.
    fn write(&self, v: &Volume, offset: u64, data: &[u8]) {
        let dev = self.vg.vol_dev(v);
        let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.write_all_at(data, offset).unwrap();
        f.sync_all().unwrap();
    }

    fn objects(&self) -> Vec<String> {
        self.vg.lv_names()
    }
}

mod thin {
    use super::*;
    kiln_testkit::contract_tests!(target(true).await);
}

mod thick {
    use super::*;
    kiln_testkit::contract_tests!(target(false).await);
}
