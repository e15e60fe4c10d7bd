//! Named scenarios: which faults the nemesis mixes, and the cluster they need.

use crate::nemesis::FaultKind;

pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    pub faults: &'static [FaultKind],
    /// Nodes to run with unless `--nodes` says otherwise.
    pub default_nodes: u64,
}

use FaultKind::*;

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "smoke",
        description: "kills, pauses and partitions mixed; a useful check in 60 seconds",
        faults: &[Kill, Pause, PartitionLeader, MajorityMinority],
        default_nodes: 3,
    },
    Scenario {
        name: "crashes",
        description: "kill -9 and SIGSTOP of single nodes",
        faults: &[Kill, Pause],
        default_nodes: 3,
    },
    Scenario {
        name: "partitions",
        description: "isolated shard leaders, majority/minority splits, bridges and rings",
        faults: &[PartitionLeader, MajorityMinority, Bridge, Ring],
        default_nodes: 5,
    },
    Scenario {
        name: "links",
        description: "slow (100 ms ± 80 ms), lossy (3% of chunks reset the connection) and blackholed links",
        faults: &[SlowLinks, LossyLinks, Blackhole],
        default_nodes: 3,
    },
    Scenario {
        name: "leaders",
        description: "leader transfers in a loop",
        faults: &[TransferLeader],
        default_nodes: 3,
    },
    Scenario {
        name: "membership",
        description: "a node added and removed again under load",
        faults: &[Membership],
        default_nodes: 3,
    },
    Scenario {
        name: "wipe",
        description: "a node restarted with its data dir wiped, rejoining through another",
        faults: &[Wipe],
        default_nodes: 3,
    },
    Scenario {
        name: "disk",
        description: "one node's data dir on a small filesystem that fills up, then frees (needs root to mount it)",
        faults: &[DiskFull],
        default_nodes: 3,
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
        ],
        default_nodes: 5,
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}
