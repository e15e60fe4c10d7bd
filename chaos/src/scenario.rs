//! Named scenarios: which faults the nemesis mixes, and the cluster they need.

use crate::nemesis::FaultKind;

pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    pub faults: &'static [FaultKind],
    /// Nodes to run with unless `--nodes` says otherwise.
    pub default_nodes: u64,
    /// Unkeyed-set clients (writes without a `request_id`, each sent once) unless
    /// `--unkeyed-clients` says otherwise: on in the scenarios that kill, pause and cut off shard
    /// leaders, where a write forwarded as its leader fails could be applied twice.
    pub unkeyed_clients: u32,
}

/// Unkeyed-set clients of the scenarios that run them. A write is applied twice only when it is
/// in flight to a shard leader at the moment the leader fails, so the chance grows with the
/// writes in flight: on 3 nodes, 16 clients found 6 in each of two 120 s smoke runs where 4
/// clients found none in 180 s.
const UNKEYED: u32 = 16;

use FaultKind::*;

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "smoke",
        description: "kills, pauses and partitions mixed; a useful check in 60 seconds",
        faults: &[Kill, Pause, PartitionLeader, MajorityMinority],
        default_nodes: 3,
        unkeyed_clients: UNKEYED,
    },
    Scenario {
        name: "crashes",
        description: "kill -9 and SIGSTOP of single nodes",
        faults: &[Kill, Pause],
        default_nodes: 3,
        unkeyed_clients: UNKEYED,
    },
    Scenario {
        name: "partitions",
        description: "isolated shard leaders, majority/minority splits, bridges and rings",
        faults: &[PartitionLeader, MajorityMinority, Bridge, Ring],
        default_nodes: 5,
        unkeyed_clients: UNKEYED,
    },
    Scenario {
        name: "links",
        description: "slow (100 ms ± 80 ms), lossy (3% of chunks reset the connection) and blackholed links",
        faults: &[SlowLinks, LossyLinks, Blackhole],
        default_nodes: 3,
        unkeyed_clients: 0,
    },
    Scenario {
        name: "leaders",
        description: "leader transfers in a loop",
        faults: &[TransferLeader],
        default_nodes: 3,
        unkeyed_clients: 0,
    },
    Scenario {
        name: "membership",
        description: "a node added and removed again under load",
        faults: &[Membership],
        default_nodes: 3,
        unkeyed_clients: 0,
    },
    Scenario {
        name: "wipe",
        description: "a node restarted with its data dir wiped, rejoining through another",
        faults: &[Wipe],
        default_nodes: 3,
        unkeyed_clients: 0,
    },
    Scenario {
        name: "disk",
        description: "one node's data dir on a small filesystem that fills up, then frees (needs root to mount it)",
        faults: &[DiskFull],
        default_nodes: 3,
        unkeyed_clients: 0,
    },
    Scenario {
        name: "corrupt",
        description:
            "a stopped node's replica damaged (a record changed, one deleted), restarted; anti-entropy repairs it",
        faults: &[Corrupt],
        default_nodes: 3,
        unkeyed_clients: 0,
    },
    Scenario {
        name: "rot",
        description: "a stopped node's table files rotted (bytes flipped, a block run zeroed), restarted; it sets \
                      the damaged files aside and its peers re-seed the replicas they held",
        faults: &[Rot],
        default_nodes: 3,
        unkeyed_clients: 0,
    },
    Scenario {
        name: "all",
        description: "every fault above, mixed (for long runs)",
        faults: &[
            Kill,
            Pause,
            PartitionLeader,
            MajorityMinority,
            Bridge,
            Ring,
            SlowLinks,
            LossyLinks,
            Blackhole,
            TransferLeader,
            Membership,
            Corrupt,
            Rot,
        ],
        default_nodes: 5,
        unkeyed_clients: UNKEYED,
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}
