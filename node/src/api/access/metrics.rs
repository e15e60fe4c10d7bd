//! Metrics of access control, registered in the node's registry by [`crate::metrics`].

use std::sync::LazyLock;

use prometheus::{IntCounterVec, Opts};

pub static REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_http_auth_refused_total",
            "HTTP requests refused by access control, by reason (token_required, invalid_token, role_insufficient, agent_not_allowed, cross_origin, loopback_host)",
        ),
        &["reason"],
    )
    .expect("valid metric")
});

pub static RATE_LIMITED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_http_rate_limited_total",
            "HTTP requests answered 429 rate_limited, by endpoint class (read, write, admin)",
        ),
        &["class"],
    )
    .expect("valid metric")
});

pub static AUDIT_ENTRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_audit_entries_total",
            "Admin actions recorded in the audit log, by outcome (done: 2xx; refused: 4xx; failed: 5xx; unrecorded: the entry could not be stored)",
        ),
        &["outcome"],
    )
    .expect("valid metric")
});

/// Every collector of this module; the known label values start at 0.
pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    for reason in
        ["token_required", "invalid_token", "role_insufficient", "agent_not_allowed", "cross_origin", "loopback_host"]
    {
        REFUSED.with_label_values(&[reason]);
    }
    for class in ["read", "write", "admin"] {
        RATE_LIMITED.with_label_values(&[class]);
    }
    for outcome in ["done", "refused", "failed", "unrecorded"] {
        AUDIT_ENTRIES.with_label_values(&[outcome]);
    }
    vec![Box::new(REFUSED.clone()), Box::new(RATE_LIMITED.clone()), Box::new(AUDIT_ENTRIES.clone())]
}
