//! The StemeDB chaos and correctness harness (`stemedb-chaos`): runs a cluster of real `stemedb`
//! processes, drives client workloads against it while a nemesis injects faults, then checks
//! the histories (linearizability of registers, lost and duplicated writes, replica
//! convergence) and writes a report; and the disaster-recovery drill (`dr_drill`: backup,
//! destruction, restore into a new cluster, RPO and RTO). See docs/reliability.md.

pub mod dr_drill;
pub mod failover;
pub mod history;
pub mod linearizability;
pub mod nemesis;
pub mod probe;
pub mod run;
pub mod scenario;
pub mod workload;
