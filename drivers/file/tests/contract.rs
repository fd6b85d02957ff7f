//! The driver contract suite (`kiln_testkit::contract`) on the file backend's three real
//! modes: raw+reflink on a loop-mounted XFS, qcow2 chains with the real qemu-img, and raw
//! full copies on a filesystem without reflink.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use common::Env;
use kiln_core::{Volume, VolumeDriver};
use kiln_driver_file::Mode;
use kiln_testkit::contract::Target;

/// A file backend under the contract suite.
struct FileTarget(Env);

impl Target for FileTarget {
    fn driver(&self) -> Arc<dyn VolumeDriver> {
        Arc::new(self.0.driver.clone())
    }

    fn backend(&self) -> String {
        "file-test".into()
    }

    fn write(&self, v: &Volume, offset: u64, data: &[u8]) {
        let image = self.0.driver.active_image(v).unwrap();
        match self.0.driver.mode() {
            // What a guest writes through a hypervisor lands in the qcow2 active layer:
            // write through qemu-io, which speaks the format.
            Mode::Qcow2 => {
                let src = tempfile::NamedTempFile::new().unwrap();
                std::fs::write(src.path(), data).unwrap();
                let cmd = format!("write -s {} {offset} {}", src.path().display(), data.len());
                let out = std::process::Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", &cmd, "-c", "flush"])
                    .arg(&image)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "qemu-io: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Mode::RawReflink | Mode::RawFullCopy => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&image)
                    .unwrap();
                f.write_all_at(data, offset).unwrap();
                f.sync_all().unwrap();
            }
        }
    }

    fn objects(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(self.0.driver.path(), self.0.driver.path(), &mut out);
        out.sort();
        out
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        // Lock files are bookkeeping a reader creates once; not backend objects.
        if p.extension().is_some_and(|x| x == "lock") {
            continue;
        }
        out.push(p.strip_prefix(root).unwrap().display().to_string());
        if p.is_dir() {
            walk(root, &p, out);
        }
    }
}

mod raw_reflink {
    use super::*;
    kiln_testkit::contract_tests!(Arc::new(FileTarget(Env::raw().await)));
}

mod qcow2 {
    use super::*;
    kiln_testkit::contract_tests!(Arc::new(FileTarget(Env::qcow2().await)));
}

mod raw_full_copy {
    use super::*;
    kiln_testkit::contract_tests!(Arc::new(FileTarget(Env::raw_full_copy().await)));
}
