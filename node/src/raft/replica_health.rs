//! What anti-entropy has established about this node's replica of one group since the node
//! started, read by the group's requests, elections and transport.
//!
//! - **Checked**: a replica is unchecked from start until its first scrub (and the repair that
//!   scrub started, if any) has ended. Until then it does not campaign, and it serves no request
//!   from its own state: a follower sends reads on to another replica, a replica that restarted
//!   as leader (openraft restores a committed leadership at once) holds its requests until the
//!   check ends. Replicas this node does not host, and every replica when anti-entropy is off,
//!   are checked from the start.
//! - **Suspect**: a replica being repaired. It never sends a snapshot (nor does an unchecked
//!   one): the transport answers "unreachable", and openraft tries again later.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Anti-entropy's word on one replica (see the module doc).
#[derive(Debug)]
pub struct ReplicaHealth {
    checked: tokio::sync::watch::Sender<bool>,
    suspect: AtomicBool,
}

impl ReplicaHealth {
    /// A replica that is `checked` already (or not yet).
    pub fn new(checked: bool) -> ReplicaHealth {
        ReplicaHealth { checked: tokio::sync::watch::Sender::new(checked), suspect: AtomicBool::new(false) }
    }

    pub fn checked(&self) -> bool {
        *self.checked.borrow()
    }

    /// Records that the replica's start-up check has ended. Returns whether it was unchecked.
    pub fn mark_checked(&self) -> bool {
        !self.checked.send_replace(true)
    }

    pub fn suspect(&self) -> bool {
        self.suspect.load(Ordering::Acquire)
    }

    pub fn set_suspect(&self, suspect: bool) {
        self.suspect.store(suspect, Ordering::Release);
    }

    /// Whether this replica may send its snapshot to a follower.
    pub fn sends_snapshots(&self) -> bool {
        self.checked() && !self.suspect()
    }

    /// Waits until the replica is checked; `false` if `deadline` came first.
    pub async fn until_checked(&self, deadline: Instant) -> bool {
        let mut watch = self.checked.subscribe();
        let wait = async { watch.wait_for(|checked| *checked).await.is_ok() };
        tokio::time::timeout_at(deadline.into(), wait).await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn an_unchecked_replica_holds_its_waiters_until_it_is_checked() {
        let health = std::sync::Arc::new(ReplicaHealth::new(false));
        assert!(!health.sends_snapshots());
        assert!(!health.until_checked(Instant::now() + Duration::from_millis(20)).await);
        let waiter = {
            let health = health.clone();
            tokio::spawn(async move { health.until_checked(Instant::now() + Duration::from_secs(10)).await })
        };
        assert!(health.mark_checked());
        assert!(waiter.await.unwrap());
        assert!(!health.mark_checked(), "a second mark changes nothing");
        assert!(health.sends_snapshots());
        health.set_suspect(true);
        assert!(!health.sends_snapshots(), "a replica under repair sends no snapshot");
        health.set_suspect(false);
        assert!(health.sends_snapshots());
    }
}
