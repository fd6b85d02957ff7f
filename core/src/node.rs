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

/// This process's incarnation: `<node>:<pid>:<random>`, unique across restarts and nodes.
pub fn incarnation() -> &'static str {
    INCARNATION.get_or_init(|| {
        let random = uuid::Uuid::new_v4().simple().to_string();
        format!("{}:{}:{}", name(), std::process::id(), &random[..12])
    })
}

/// Whether `incarnation` ran on this node and its process no longer exists. (Node names are
/// unique per host; a reused pid only makes this answer "maybe alive", never "gone".)
pub fn gone_from_this_host(incarnation: &str) -> bool {
    let mut parts = incarnation.rsplitn(3, ':');
    let (Some(_random), Some(pid), Some(node)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    node == name()
        && pid
            .parse::<u32>()
            .is_ok_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_process_of_this_node_is_gone() {
        let me = incarnation();
        assert!(!gone_from_this_host(me));
        // pid 0 never names a process in /proc.
        assert!(gone_from_this_host(&format!("{}:0:abc", name())));
        assert!(!gone_from_this_host("another-node:0:abc"));
        assert!(!gone_from_this_host("garbage"));
    }
}
