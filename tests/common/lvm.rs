//! The LVM end-to-end tests' fixture, inside the user-mode-Linux guest: a private volume
//! group on a loop device with a thin pool, kiln's `thin` and `thick` backends on it, and the
//! VG's state as `lvs` reports it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Panics unless we run as root inside the UML guest with device-mapper: a test that
/// silently skipped would prove nothing. `test` names the test target, for the hint.
pub fn require_uml_guest(test: &str) {
    let in_guest = std::env::var("KILN_UML_GUEST").as_deref() == Ok("1");
    let dm = Path::new("/dev/mapper/control").exists();
    assert!(
        in_guest && dm,
        "the kiln LVM tests must run inside the user-mode-Linux guest with device-mapper \
         (KILN_UML_GUEST={:?}, /dev/mapper/control exists: {dm}); run \
         tests/harness/lvm-suite.sh, or set \
         CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/tests/harness/uml-run.sh and run \
         `cargo test -p kiln --features rbd,failpoints --test {test} -- --test-threads=1`",
        std::env::var("KILN_UML_GUEST").ok()
    );
}

/// Runs a system command (argv), panicking with its output when it fails; returns stdout,
/// trimmed.
pub fn sys(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A private VG named `<prefix>-<token>` on a loop device over a sparse file of `pv_bytes` in
/// `dir`, with a thin pool `pool` of `pool_size` (lvcreate's `-L`). The VG and its loop
/// device are removed on drop.
pub struct TestVg {
    /// The VG's name.
    pub vg: String,
    loopdev: String,
}

impl TestVg {
    pub fn new(prefix: &str, dir: &Path, pv_bytes: u64, pool_size: &str) -> TestVg {
        let vg = format!("{prefix}-{}", super::unique_token());
        let img = dir.join("pv.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(pv_bytes).unwrap();
        drop(f);
        let loopdev = sys(&["losetup", "-f", "--show", img.to_str().unwrap()]);
        let t = TestVg {
            vg: vg.clone(),
            loopdev: loopdev.clone(),
        };
        sys(&["vgcreate", "-q", &vg, &loopdev]);
        sys(&[
            "lvcreate",
            "-q",
            "--type",
            "thin-pool",
            "-Zy",
            "-L",
            pool_size,
            "-n",
            "pool",
            &vg,
        ]);
        t
    }

    /// kiln's config for backends `thin` (the default) and `thick` on this VG.
    pub fn config(&self) -> String {
        let vg = &self.vg;
        format!(
            "default_backend = \"thin\"\n\n\
             [backends.thin]\ndriver = \"lvm\"\nvolume_group = \"{vg}\"\ntype = \"thin\"\n\
             thin_pool = \"pool\"\ncommand_timeout_secs = 60\n\n\
             [backends.thick]\ndriver = \"lvm\"\nvolume_group = \"{vg}\"\ntype = \"thick\"\n\
             thick_snapshot_percent = 100\ncommand_timeout_secs = 60\n"
        )
    }

    /// `name attr size origin` of every LV (hidden ones too), sorted. The open flag (6th attr
    /// character) of the thin pool and its hidden LVs is masked: LVM opens the pool's device
    /// when the first thin LV appears and keeps it open after the last one is gone.
    pub fn lv_state(&self) -> Vec<String> {
        let out = sys(&[
            "lvs",
            "-a",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_name,lv_attr,lv_size,origin",
            &self.vg,
        ]);
        let mut v: Vec<String> = out
            .lines()
            .map(|l| {
                let mut f: Vec<String> = l.split_whitespace().map(String::from).collect();
                if f.len() > 1 && (f[0] == "pool" || f[0].starts_with('[')) {
                    f[1].replace_range(5..6, "-");
                }
                f.join(" ")
            })
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    /// `lvs` row of one LV as (attr, size in bytes, origin), or None when it does not exist.
    pub fn lv(&self, name: &str) -> Option<(String, u64, String)> {
        self.lv_state().iter().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0] == name).then(|| {
                (
                    f[1].to_string(),
                    f[2].parse().unwrap(),
                    f.get(3).unwrap_or(&"").to_string(),
                )
            })
        })
    }

    /// The device node of an LV of this VG from a `provider_location` (`vg/lv`), as libdm
    /// names it.
    pub fn dev(&self, provider_location: &str) -> PathBuf {
        let (vg, lv) = provider_location.split_once('/').unwrap();
        assert_eq!(vg, self.vg, "provider_location {provider_location}");
        PathBuf::from(format!(
            "/dev/mapper/{}-{}",
            vg.replace('-', "--"),
            lv.replace('-', "--")
        ))
    }
}

impl Drop for TestVg {
    fn drop(&mut self) {
        for argv in [
            vec!["vgremove", "-q", "-f", self.vg.as_str()],
            vec!["losetup", "-d", self.loopdev.as_str()],
        ] {
            let _ = Command::new(argv[0])
                .args(&argv[1..])
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .stdin(Stdio::null())
                .output();
        }
    }
}
