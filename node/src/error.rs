//! The one error-code table. Every error a client or a peer can see has exactly one
//! [`ErrorCode`]: a stable string, one HTTP status, one gRPC code, and whether a retry can
//! succeed. The client API (18180), the cluster admin API (18181) and the inter-node gRPC server
//! (18182) all answer from it; each layer's `thiserror` enum maps its variants onto it with a
//! `code()` method, and nothing decides anything by an error's text. `docs/api.md` lists exactly
//! these codes (a test checks it).
//!
//! Retryable means the same request may succeed later unchanged; for a write whose outcome is
//! unknown (`timeout`, `outcome_unknown`) a retry is only safe with the same `request_id`.

/// Declares the table: `Variant = "code", http status, gRPC code, retry|final;`.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal, $http:literal, $grpc:ident, $retry:ident;)*) => {
        /// A stable error code; see the module documentation.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The stable string clients match on.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// What the code means (its line in the table), as the OpenAPI documents say it.
            pub const fn description(self) -> &'static str {
                match self { $(ErrorCode::$variant => concat!($($doc),*),)* }
            }

            /// The HTTP status of every response with this code.
            pub const fn http_status(self) -> u16 {
                match self { $(ErrorCode::$variant => $http,)* }
            }

            /// The gRPC status code of every gRPC answer with this code.
            pub const fn grpc_code(self) -> tonic::Code {
                match self { $(ErrorCode::$variant => tonic::Code::$grpc,)* }
            }

            /// Whether the same request may succeed if sent again later.
            pub const fn retryable(self) -> bool {
                match self { $(ErrorCode::$variant => error_codes!(@retry $retry),)* }
            }
        }
    };
    (@retry retry) => { true };
    (@retry final) => { false };
}

error_codes! {
    /// body is empty, or not valid JSON (`details.line`, `details.column`)
    MalformedJson = "malformed_json", 400, InvalidArgument, final;
    /// a request object has a field it does not define (`details.field`)
    UnknownField = "unknown_field", 400, InvalidArgument, final;
    /// the body could not be read
    UnreadableBody = "unreadable_body", 400, InvalidArgument, final;
    /// unknown or unparsable query parameter
    InvalidQueryString = "invalid_query_string", 400, InvalidArgument, final;
    /// an assertion id (path, `assertion_id`, `supersedes`) is not 26 Crockford base-32 characters
    InvalidId = "invalid_id", 400, InvalidArgument, final;
    /// `lens` is not one of the six lenses
    UnknownLens = "unknown_lens", 400, InvalidArgument, final;
    /// `as_of`, `since` or `until` is not unix ms or RFC 3339
    InvalidTime = "invalid_time", 400, InvalidArgument, final;
    /// `consistency` is not `linearizable` or `stale`
    InvalidConsistency = "invalid_consistency", 400, InvalidArgument, final;
    /// `limit` is 0 or over `query.max_limit` (for the admin and authority listings: outside
    /// 1-1000)
    InvalidLimit = "invalid_limit", 400, InvalidArgument, final;
    /// `cursor` was not produced by the server (for listings of assertions: not an assertion id)
    InvalidCursor = "invalid_cursor", 400, InvalidArgument, final;
    /// `GET /v1/assertions` without `agent_id`, `since` or `until`
    MissingFilter = "missing_filter", 400, InvalidArgument, final;
    /// `GET /v1/authority/agents/{agent_id}` without `concept_path`
    MissingConceptPath = "missing_concept_path", 400, InvalidArgument, final;
    /// a grant id in the path is not a number
    InvalidGrantId = "invalid_grant_id", 400, InvalidArgument, final;
    /// `GET /v1/admin/circuit-breaker` with a `state` other than `open`, `half_open`, `closed`,
    /// `all`
    InvalidState = "invalid_state", 400, InvalidArgument, final;
    /// `/v1/admin/*` endpoint without a valid bearer token (or, with no token configured, from a
    /// non-loopback client, or from a loopback client whose `Host` names another host); on the
    /// cluster admin port, a `POST` or `DELETE` without it when a token is configured
    AdminTokenRequired = "admin_token_required", 401, Unauthenticated, final;
    /// the node has `security.tokens` and the request has no `Authorization: Bearer <token>`
    /// (health checks and `/metrics` need none)
    TokenRequired = "token_required", 401, Unauthenticated, final;
    /// the bearer token is none of the node's tokens (revoked, mistyped, or of another cluster)
    InvalidToken = "invalid_token", 401, Unauthenticated, final;
    /// the token's role does not cover the endpoint's class: `read` < `write` < `admin`; `details`:
    /// `token`, `role`, `needs`
    RoleInsufficient = "role_insufficient", 403, PermissionDenied, final;
    /// the token is bound to agent ids (`agents`) and the request writes (claims, votes,
    /// retractions, grants) as another; `details`: `token`, `agent_id`, `allowed`
    AgentNotAllowed = "agent_not_allowed", 403, PermissionDenied, final;
    /// a change (any method but `GET`, `HEAD`, `OPTIONS`) whose `Origin` header (a browser's page)
    /// does not name the host it was sent to: another site's page cannot make a browser change a
    /// node (a node on loopback without tokens would otherwise obey it); `details`: `origin`,
    /// `host`. Clients other than browsers send no `Origin`
    CrossOriginRefused = "cross_origin_refused", 403, PermissionDenied, final;
    /// on a node without `security.tokens` (and without `security.allow_unauthenticated`), a
    /// request from a loopback client whose `Host` is not a loopback host (`localhost`,
    /// `*.localhost`, `127.0.0.0/8`, `[::1]`): a web page whose name an attacker made resolve to
    /// 127.0.0.1 (DNS rebinding). Open the node as `localhost` or by address, or set tokens;
    /// `details`: `host`
    LoopbackHostRequired = "loopback_host_required", 403, PermissionDenied, final;
    /// the caller (its token, else its address) is over its rate for the endpoint class
    /// (`rate_limits.read_per_second`, `write_per_second`, `admin_per_second`); `Retry-After` and
    /// `details.retry_after_seconds` say when to try again
    RateLimited = "rate_limited", 429, ResourceExhausted, retry;
    /// retraction by an agent other than the asserting one, without admin rights
    NotAssertionOwner = "not_assertion_owner", 403, PermissionDenied, final;
    /// `security.require_signatures` is on and the write has no signature
    /// ([signatures](signatures.md))
    SignatureRequired = "signature_required", 401, Unauthenticated, final;
    /// a signature was given (or required) but the signer's id is not a hex Ed25519 public key
    AgentIdNotPublicKey = "agent_id_not_public_key", 401, Unauthenticated, final;
    /// the signature is not 128 hex characters
    MalformedSignature = "malformed_signature", 401, Unauthenticated, final;
    /// the signature does not verify over the canonical bytes
    InvalidSignature = "invalid_signature", 401, Unauthenticated, final;
    /// a grant of more than the grantor holds for the prefix (or from an agent without authority
    /// there)
    InsufficientAuthority = "insufficient_authority", 403, PermissionDenied, final;
    /// a revocation with `agent_id` other than the grant's grantor
    NotGrantor = "not_grantor", 403, PermissionDenied, final;
    /// the agent's breaker was tripped by an operator (open, or half-open beyond the probe)
    CircuitBreakerTripped = "circuit_breaker_tripped", 403, PermissionDenied, final;
    /// no such endpoint (client API or cluster admin)
    NotFound = "not_found", 404, NotFound, final;
    /// the id (or a `supersedes` target) does not exist, or its shard number is out of range
    AssertionNotFound = "assertion_not_found", 404, NotFound, final;
    /// no grant with that id
    GrantNotFound = "grant_not_found", 404, NotFound, final;
    /// `DELETE /v1/admin/authority/roots/{agent_id}` for an agent that is not a root
    RootNotFound = "root_not_found", 404, NotFound, final;
    /// `GET /cluster/shards/{id}` (or `/digest`), `POST /admin/shards/rebalance` or
    /// `transfer-leader` with a shard that is not a number below `cluster.shards`
    UnknownShard = "unknown_shard", 404, NotFound, final;
    /// `GET /cluster/shards/{id}/digest` on a node that has no replica of the shard (`hosted` is
    /// false)
    NotHosted = "not_hosted", 404, NotFound, final;
    /// `DELETE /cluster/members/{id}` with an id that is not a number or not a node of the cluster
    /// metadata in this node's view; `POST /admin/shards/rebalance` with a `target_node` or
    /// `from_node` that is not a member
    UnknownMember = "unknown_member", 404, NotFound, final;
    /// a known path with the wrong HTTP method (client API or cluster admin)
    MethodNotAllowed = "method_not_allowed", 405, Unimplemented, final;
    /// the assertion is already retracted
    AlreadyRetracted = "already_retracted", 409, AlreadyExists, final;
    /// a shard's leader refused a membership change, e.g. a leader transfer to a node that is not a
    /// voter or that lost the race to another follower (replica moves record such errors in the
    /// shard's `rebalance.error`)
    MembershipChangeFailed = "membership_change_failed", 409, AlreadyExists, final;
    /// `POST /cluster/members` with an id that is a member with another `raft_addr`, or a
    /// `raft_addr` that belongs to another node
    MemberConflict = "member_conflict", 409, AlreadyExists, final;
    /// `DELETE /cluster/members/{id}` of the only node that is not leaving
    LastMember = "last_member", 409, AlreadyExists, final;
    /// `POST /admin/shards/rebalance` for a shard with a move `PENDING` or `IN_PROGRESS`
    RebalanceInProgress = "rebalance_in_progress", 409, AlreadyExists, retry;
    /// the grant is already revoked
    GrantAlreadyRevoked = "grant_already_revoked", 409, AlreadyExists, final;
    /// a reset of a breaker that is not open or half-open (or does not exist)
    BreakerNotOpen = "breaker_not_open", 409, AlreadyExists, final;
    /// a quarantine decision on a claim that is not awaiting one
    NotQuarantined = "not_quarantined", 409, AlreadyExists, final;
    /// `POST /v1/admin/indexes/rebuild` while a rebuild runs on this node
    RebuildInProgress = "rebuild_in_progress", 409, AlreadyExists, retry;
    /// `POST /v1/admin/storage/compact` (or `/v1/admin/compact`) while a manual compaction runs on
    /// this node
    CompactionInProgress = "compaction_in_progress", 409, AlreadyExists, retry;
    /// body over `limits.max_request_bytes`
    PayloadTooLarge = "payload_too_large", 413, InvalidArgument, final;
    /// `value` over `limits.max_value_bytes`
    ValueTooLarge = "value_too_large", 413, InvalidArgument, final;
    /// `source` over 4096 bytes
    SourceTooLarge = "source_too_large", 413, InvalidArgument, final;
    /// `value` or `source` nests arrays and objects deeper than `limits.max_value_depth` (details
    /// `field`, `depth`, `limit`)
    ValueTooDeep = "value_too_deep", 400, InvalidArgument, final;
    /// more than `limits.max_batch_items` items (`details.items`, `details.limit`)
    BatchTooLarge = "batch_too_large", 413, InvalidArgument, final;
    /// a required field is absent (`details.field`)
    MissingField = "missing_field", 422, InvalidArgument, final;
    /// a field has the wrong type or range for its JSON type (e.g. `"confidence": "high"`, a
    /// negative `limit`), or the body is not a JSON object
    InvalidField = "invalid_field", 422, InvalidArgument, final;
    /// `concept_path`, `concept_prefix` or `prefix` breaks the path rules
    InvalidConceptPath = "invalid_concept_path", 422, InvalidArgument, final;
    /// `predicate` breaks the predicate rules
    InvalidPredicate = "invalid_predicate", 422, InvalidArgument, final;
    /// `agent_id` empty, over 128 characters, or with control characters
    InvalidAgentId = "invalid_agent_id", 422, InvalidArgument, final;
    /// `confidence` outside [0, 1]
    InvalidConfidence = "invalid_confidence", 422, InvalidArgument, final;
    /// more than 64 `supersedes` ids
    TooManySupersedes = "too_many_supersedes", 422, InvalidArgument, final;
    /// a `supersedes` target is on another concept_path
    SupersedesOtherConcept = "supersedes_other_concept", 422, InvalidArgument, final;
    /// `source` is not a JSON object
    InvalidSource = "invalid_source", 422, InvalidArgument, final;
    /// `signature` empty, over 256 characters, or not hex
    InvalidSignatureFormat = "invalid_signature_format", 422, InvalidArgument, final;
    /// `request_id` empty, over 128 characters, or with control characters
    InvalidRequestId = "invalid_request_id", 422, InvalidArgument, final;
    /// vote `value` is not 1 or -1
    InvalidVote = "invalid_vote", 422, InvalidArgument, final;
    /// retraction `reason` over 1024 characters
    ReasonTooLong = "reason_too_long", 422, InvalidArgument, final;
    /// `assertions` is an empty array
    EmptyBatch = "empty_batch", 422, InvalidArgument, final;
    /// a query gives both or neither of `concept_path` and `concept_prefix`
    InvalidQuery = "invalid_query", 422, InvalidArgument, final;
    /// `POST /cluster/members` with `"id": 0`
    InvalidNodeId = "invalid_node_id", 422, InvalidArgument, final;
    /// `POST /cluster/members` with a `raft_addr` that is not `IP:PORT`
    InvalidRaftAddr = "invalid_raft_addr", 422, InvalidArgument, final;
    /// `POST /admin/shards/rebalance` whose `target_node` already holds a replica of the shard or
    /// is `LEAVING`, or whose `from_node` holds none
    InvalidRebalance = "invalid_rebalance", 422, InvalidArgument, final;
    /// an authority `level` outside 0-100
    InvalidLevel = "invalid_level", 422, InvalidArgument, final;
    /// a grant whose grantee is its grantor
    SelfGrant = "self_grant", 422, InvalidArgument, final;
    /// the agent's breaker was opened automatically (or this write pushed it over
    /// `circuit_breaker.max_writes_per_sec`); `Retry-After` gives the seconds until it half-opens
    CircuitBreakerOpen = "circuit_breaker_open", 429, ResourceExhausted, retry;
    /// the shard has no leader within the write timeout or read deadline, or its leader cannot
    /// confirm its leadership with a quorum for a read; retry (`Retry-After: 1`)
    NoQuorum = "no_quorum", 503, Unavailable, retry;
    /// a write, read index or membership change forwarded to the shard leader reached a node that
    /// no longer leads it (forwarded requests are not forwarded again); `details.leader` is the
    /// leader that node knows, or `null`; retry
    NotLeader = "not_leader", 503, Unavailable, retry;
    /// this node could not reach the shard leader to forward a write, read index or membership
    /// change (`details.leader`); for a write whose connection broke after sending, it may have
    /// been applied: retry with the same `request_id`
    LeaderUnreachable = "leader_unreachable", 503, Unavailable, retry;
    /// the shard's Raft group is stopping or failed
    ShuttingDown = "shutting_down", 503, Unavailable, retry;
    /// a change of the cluster metadata (member, decommission, replica move) before the meta
    /// group's leader has recorded the bootstrap, in the first seconds of a new cluster; retry
    ClusterNotReady = "cluster_not_ready", 503, Unavailable, retry;
    /// a write (local or forwarded) was not applied within `raft.write_timeout_ms` (it may or may
    /// not have been applied: retry with the same `request_id`), a read barrier did not complete
    /// within `query.query_timeout_seconds`, or a leader transfer did not complete in time
    Timeout = "timeout", 504, DeadlineExceeded, retry;
    /// a query ran longer than `query.query_timeout_seconds`
    QueryTimeout = "query_timeout", 504, DeadlineExceeded, retry;
    /// the claims a query reads and the answer it builds would hold more than
    /// `query.max_memory_per_query_mb` (estimated); narrow the query (a `predicate`, a smaller
    /// `limit`) or raise the limit. `details`: `limit_bytes`, and `shard` (`null` for a
    /// `concept_prefix` query, whose reads span shards)
    QueryMemoryExceeded = "query_memory_exceeded", 422, InvalidArgument, final;
    /// a Raft group failed to start
    RaftStartupFailed = "raft_startup_failed", 500, Internal, final;
    /// a replica could not read its storage while answering a read
    StorageError = "storage_error", 500, Internal, final;
    /// the state machine answered a coalesced write with something unexpected (a bug)
    InternalError = "internal_error", 500, Internal, final;
    /// the process's allocator has no heap profiler (`MALLOC_CONF=prof:false`)
    HeapProfilingUnavailable = "heap_profiling_unavailable", 501, Unimplemented, final;
    /// no heap profile has been taken yet
    NoHeapProfile = "no_heap_profile", 404, NotFound, final;
    /// no heap profile of that name on disk
    HeapProfileNotFound = "heap_profile_not_found", 404, NotFound, final;
    /// the name is not a `heap-<time>.prof` name
    InvalidHeapProfileName = "invalid_heap_profile_name", 400, InvalidArgument, final;
    /// the profile could not be written or read
    HeapProfileFailed = "heap_profile_failed", 500, Internal, final;
    /// a RocksDB read or write failed
    StorageEngineError = "storage_engine_error", 500, Internal, final;
    /// the data directory cannot be used
    StorageDataDirError = "storage_data_dir_error", 500, Internal, final;
    /// a stored record could not be decoded
    StorageCorruptRecord = "storage_corrupt_record", 500, Internal, final;
    /// storage is closed (shutdown)
    StorageClosed = "storage_closed", 500, Internal, retry;
    /// internal: the state machine answered a different command
    UnexpectedResponse = "unexpected_response", 500, Internal, final;
    /// internal: storage stats could not be encoded
    EncodingFailed = "encoding_failed", 500, Internal, final;
    /// internal: an inter-node message (port 18182) could not be decoded; names the field
    MalformedMessage = "malformed_message", 400, InvalidArgument, final;
    /// anti-entropy: this replica is being repaired and is no source of truth for now
    ReplicaSuspect = "replica_suspect", 503, Unavailable, retry;
    /// anti-entropy: no healthy replica could be copied from
    RepairFailed = "repair_failed", 500, Internal, retry;
    /// a signed assertion's `value` or `source` has no canonical JSON form (nested too deeply)
    ValueNotCanonical = "value_not_canonical", 422, InvalidArgument, final;
    /// a request about a replica move of a shard that has none
    NoRebalance = "no_rebalance", 409, AlreadyExists, final;
    /// a member is removed from the metadata while it still hosts replicas
    MemberHostsReplicas = "member_hosts_replicas", 409, AlreadyExists, final;
    /// internal: a policy command reached a data shard (a bug)
    PolicyOutsideMetaGroup = "policy_outside_meta_group", 500, Internal, final;
    /// `GET /cluster/shards/{id}/digest`: the shard kept changing during the scan; retry
    ShardBusy = "shard_busy", 503, Unavailable, retry;
    /// a bounded queue (a shard's write batcher) or the HTTP concurrency limit
    /// (`server.max_concurrent_requests`) is full; nothing was done; retry after `Retry-After`
    Overloaded = "overloaded", 503, Unavailable, retry;
    /// a forwarded write could not be confirmed before its deadline (the leader failed or changed
    /// while it was in flight): it was applied at most once, but may have been; retry with the same
    /// `request_id` to learn which
    OutcomeUnknown = "outcome_unknown", 504, DeadlineExceeded, retry;
    /// a forwarded command holds more items than one log entry can number (at most 4096)
    CommandTooLarge = "command_too_large", 422, InvalidArgument, final;
    /// a read reached a replica while it installs a snapshot from its leader (its data is half old,
    /// half new until the install ends); retry, or read through another node
    ReplicaCatchingUp = "replica_catching_up", 503, Unavailable, retry;
    /// a write (claim, vote, an agent's own retraction) reached a node, or the shard's leader,
    /// whose data dir's free space is below its floor (`storage.min_free_bytes`,
    /// `storage.min_free_percent`); `details`: `shard`, `node`, `free_bytes`, `floor_bytes`;
    /// `Retry-After: 30`. Reads, admin actions and Raft's own writes go on; writes resume by
    /// themselves once space is freed ([runbook](../runbooks/disk-full.md))
    InsufficientStorage = "insufficient_storage", 507, ResourceExhausted, retry;
    /// the shard's log index passed what assertion ids can number (2^36 entries); refused on every
    /// replica, nothing written
    IdSpaceExhausted = "id_space_exhausted", 500, Internal, final;
    /// startup: the node cannot listen on a configured address (in the log and exit status; never
    /// an HTTP answer)
    ListenFailed = "listen_failed", 500, Internal, final;
    /// start-up or a SIGHUP reload: a TLS certificate, key or CA file (`server.tls_*`,
    /// `cluster.tls_*`) cannot be read or used; the message names the file (a reload keeps the
    /// running certificates)
    TlsInvalid = "tls_invalid", 500, Internal, final;
    /// a server of the node failed (in the log and exit status; never an HTTP answer)
    ServeFailed = "serve_failed", 500, Internal, final;
    /// startup: the node cannot join the cluster through --join (in the log and exit status; never
    /// an HTTP answer)
    JoinFailed = "join_failed", 500, Internal, final;
    /// the node stopped after a fatal Raft error (in the log and exit status; never an HTTP answer)
    RaftFatal = "raft_fatal", 500, Internal, final;
    /// startup: a config value is invalid (in the log and exit status; never an HTTP answer)
    ConfigInvalid = "config_invalid", 500, Internal, final;
    /// startup: the config file cannot be read or parsed (in the log and exit status; never an HTTP
    /// answer)
    ConfigFileError = "config_file_error", 500, Internal, final;
    /// startup: the data dir belongs to another node id (in the log and exit status; never an HTTP
    /// answer)
    NodeIdMismatch = "node_id_mismatch", 500, Internal, final;
    /// startup: the data dir belongs to another cluster (in the log and exit status; never an HTTP
    /// answer)
    ClusterIdMismatch = "cluster_id_mismatch", 500, Internal, final;
    /// startup: cluster.shards differs from the data dir (in the log and exit status; never an HTTP
    /// answer)
    ShardCountMismatch = "shard_count_mismatch", 500, Internal, final;
    /// startup: the data dir format is not supported (in the log and exit status; never an HTTP
    /// answer)
    FormatMismatch = "format_mismatch", 500, Internal, final;
    /// a backup destination or source that is neither a directory path nor `s3://bucket/prefix`, or
    /// an S3 setting the client refuses
    BackupDestinationInvalid = "backup_destination_invalid", 400, InvalidArgument, final;
    /// no backup with that id: no manifest (an interrupted backup has none and does not exist), or
    /// no backup running or finished on this node with that id
    BackupNotFound = "backup_not_found", 404, NotFound, final;
    /// `POST /v1/admin/backup` while this node coordinates another backup; `details.id` names it
    BackupInProgress = "backup_in_progress", 409, AlreadyExists, final;
    /// the backup store (directory or S3) could not be read or written; nothing of a partial backup
    /// counts (no manifest)
    BackupStoreFailed = "backup_store_failed", 502, Unavailable, retry;
    /// a stored backup file or manifest does not match its checksum or cannot be decoded; the
    /// message names the file and the shard
    BackupDamaged = "backup_damaged", 422, DataLoss, final;
    /// no healthy replica of a shard could be copied (every replica hosting it is unchecked,
    /// suspect, unreachable or found damaged while copied); `details.shard`
    BackupFailed = "backup_failed", 500, Internal, retry;
    /// `stemedb backup restore`: the data dir already holds data, or the backup does not fit the
    /// new cluster (shard count); in the command's output and exit status, never an HTTP answer
    RestoreRefused = "restore_refused", 409, FailedPrecondition, final;
    /// a message on the transport (18182) from a node of another cluster (its requests name their
    /// cluster id in the `user-agent` header): for example a node of a cluster that was restored
    /// elsewhere from a backup; refused before anything is done (in the sender's log, never an HTTP
    /// answer)
    WrongCluster = "wrong_cluster", 403, PermissionDenied, final;
}

impl ErrorCode {
    /// The code whose string is `name`.
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|code| code.as_str() == name)
    }

    /// A gRPC status carrying this code: its gRPC code, the message, and the code's string in
    /// the `stemedb-error-code` metadata, so a peer maps it back without reading the text.
    pub fn to_status(self, message: impl Into<String>) -> tonic::Status {
        let mut status = tonic::Status::new(self.grpc_code(), message);
        if let Ok(value) = tonic::metadata::MetadataValue::try_from(self.as_str()) {
            status.metadata_mut().insert(GRPC_CODE_KEY, value);
        }
        status
    }

    /// The code a peer put on a gRPC status, if any.
    pub fn of_status(status: &tonic::Status) -> Option<ErrorCode> {
        status.metadata().get(GRPC_CODE_KEY)?.to_str().ok().and_then(ErrorCode::from_name)
    }
}

/// The gRPC metadata key that carries an [`ErrorCode`]'s string.
pub const GRPC_CODE_KEY: &str = "stemedb-error-code";

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn codes_are_unique_lowercase_and_statuses_are_errors() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate code {code}");
            assert!(code.as_str().chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{code}");
            assert!((400..600).contains(&code.http_status()), "{code}");
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(*code));
        }
    }

    #[test]
    fn a_status_carries_its_code_to_the_peer() {
        let status = ErrorCode::NotLeader.to_status("moved");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(ErrorCode::of_status(&status), Some(ErrorCode::NotLeader));
        assert_eq!(ErrorCode::of_status(&tonic::Status::unavailable("x")), None);
    }

    /// docs/api.md's "Error codes" table lists exactly the codes above, each with its HTTP
    /// status, gRPC code, retry flag and description.
    #[test]
    fn docs_list_exactly_the_codes_of_the_table() {
        let docs = include_str!("../../docs/api.md");
        let section = &docs[docs.find("## Error codes").expect("docs/api.md has an Error codes section")..];
        let mut documented = std::collections::BTreeMap::new();
        for line in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`');
            documented.insert(
                name.to_string(),
                (cells[2].to_string(), cells[3].to_string(), cells[4].to_string(), cells[5].to_string()),
            );
        }
        let mut expected = String::new();
        let mut wrong = Vec::new();
        for code in ErrorCode::ALL {
            let row = (
                code.http_status().to_string(),
                format!("{} `{:?}`", code.grpc_code() as i32, code.grpc_code()),
                if code.retryable() { "yes" } else { "no" }.to_string(),
                // The table's doc comment: the OpenAPI documents describe the code with it.
                code.description().trim().to_string(),
            );
            expected.push_str(&format!("| `{}` | {} | {} | {} | {} |\n", code, row.0, row.1, row.2, row.3));
            match documented.remove(code.as_str()) {
                Some(found) if found == row => {}
                Some(found) => wrong.push(format!("{code}: documented {found:?}, table {row:?}")),
                None => wrong.push(format!("{code}: not documented")),
            }
        }
        for name in documented.keys() {
            wrong.push(format!("{name}: documented but not in ErrorCode"));
        }
        assert!(
            wrong.is_empty(),
            "docs/api.md and ErrorCode disagree:\n{}\nexpected rows:\n{expected}",
            wrong.join("\n")
        );
    }
}
