//! Who this process is: its node's name and its incarnation, the id its journal entries
//! carry so that other nodes can tell a live owner from a dead one.

use std::sync::OnceLock;

static NODE: OnceLock<String> = OnceLock::new();
static INCARNATION: OnceLock<String> = OnceLock::new();

/// Names this process's node (once, before the first journal entry; later calls are
/// ignored). Without it the node is `local`.
pub fn set_name(name: &str) {
    let _ = NODE.set(name.to_string());
}

/// This process's node name.
pub fn name() -> &'static str {
    NODE.get_or_init(|| "local".to_string())
}

/// This process's incarnation: `<node>:<host>:<pid>:<random>`, unique across restarts and
/// nodes. `<host>` names the kernel boot and pid namespace the pid belongs to, so only a
/// process that can see that pid judges whether it still exists.
pub fn incarnation() -> &'static str {
    INCARNATION.get_or_init(|| {
        let random = uuid::Uuid::new_v4().simple().to_string();
        format!(
            "{}:{}:{}:{}",
            name(),
            host(),
            std::process::id(),
            &random[..12]
        )
    })
}

/// This kernel boot and pid namespace, as 16 hex digits: the boot id (new at every boot,
/// different on every machine) and the pid namespace's inode (a container sees other
/// pids). When /proc cannot say — either is unreadable, or the /proc mounted here belongs
/// to another pid namespace (its `self` is not this pid) — a random value of this process
/// alone, so that no incarnation ever matches it and [`gone_from_this_host`] never calls
/// anything gone.
fn host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id");
        let pidns = std::fs::read_link("/proc/self/ns/pid");
        let own_proc = std::fs::read_link("/proc/self")
            .is_ok_and(|p| p.to_str() == Some(&std::process::id().to_string()));
        match (boot, pidns) {
            (Ok(boot), Ok(pidns)) if own_proc && !boot.trim().is_empty() => format!(
                "{:016x}",
                crate::locks::stable_id(&format!("{}|{}", boot.trim(), pidns.display()))
            ),
            _ => uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
        }
    })
}

/// Whether `incarnation` ran in this kernel boot and pid namespace under this node's name
/// and its process no longer exists. Another host (even one with the same node name), an
/// earlier boot or another container never counts as gone here: its heartbeat decides. A
/// reused pid only makes the answer "maybe alive", never "gone".
pub fn gone_from_this_host(incarnation: &str) -> bool {
    let parts: Vec<&str> = incarnation.split(':').collect();
    let [node, h, pid, _random] = parts[..] else {
        return false;
    };
    node == name()
        && h == host()
        && pid
            .parse::<u32>()
            .is_ok_and(|pid| pid != 0 && !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// Handles this process has published for fencing it (see [`publish_fence`]).
static FENCES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Publishes `handle`, something another node can use to cut this process off from a
/// backend after it died (a Ceph client's address, for `osd blocklist`): it goes into this
/// incarnation's heartbeat row, and a node that takes over this process's operations hands
/// it to the backend's driver first ([`crate::driver::VolumeDriver::fence`]).
pub fn publish_fence(handle: &str) {
    let mut f = FENCES.lock().unwrap_or_else(|p| p.into_inner());
    if !f.iter().any(|h| h == handle) {
        f.push(handle.to_string());
        drop(f);
        FENCE_PUBLISHED.notify_one();
    }
}

/// Wakes the heartbeat to write a new handle at once rather than at its next beat.
pub(crate) static FENCE_PUBLISHED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Every handle [`publish_fence`] was given, in order.
pub fn fences() -> Vec<String> {
    FENCES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_process_of_this_host_and_node_is_gone() {
        let me = incarnation();
        assert!(!gone_from_this_host(me));
        // A pid no process has (beyond pid_max) of this node and host is gone.
        let dead = format!("{}:{}:{}:abc", name(), host(), u32::MAX);
        assert!(gone_from_this_host(&dead));
        // The same pid under another node name, another boot or pid namespace (another
        // host that happens to share the name), or in the format before hosts were
        // recorded: not provably gone.
        assert!(!gone_from_this_host(&format!(
            "another-node:{}:{}:abc",
            host(),
            u32::MAX
        )));
        assert!(!gone_from_this_host(&format!(
            "{}:0123456789abcdef:{}:abc",
            name(),
            u32::MAX
        )));
        assert!(!gone_from_this_host(&format!(
            "{}:{}:abc",
            name(),
            u32::MAX
        )));
        assert!(!gone_from_this_host("garbage"));
        // Here /proc answers: the value is the boot's and pid namespace's, which every
        // process of this host computes alike (not a per-process fallback).
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        let pidns = std::fs::read_link("/proc/self/ns/pid").unwrap();
        assert_eq!(
            host(),
            format!(
                "{:016x}",
                crate::locks::stable_id(&format!("{}|{}", boot.trim(), pidns.display()))
            )
        );
    }
}
