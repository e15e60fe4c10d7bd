//! Assertions, votes and retractions: what a client sends, the validation rules of DESIGN §2,
//! and what the state machine stores.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::id::AssertionId;
use super::ModelError;

pub const MAX_CONCEPT_PATH_BYTES: usize = 1024;
pub const MAX_SEGMENT_CHARS: usize = 128;
pub const MAX_PREDICATE_CHARS: usize = 256;
pub const MAX_AGENT_ID_CHARS: usize = 128;
pub const MAX_SUPERSEDES: usize = 64;
pub const MAX_SOURCE_BYTES: usize = 4096;
pub const MAX_REQUEST_ID_CHARS: usize = 128;
pub const DEFAULT_AGENT_ID: &str = "anonymous";

/// The formats below as JSON Schema patterns, for the API documents (`*Text` below). Each says
/// what its validator checks; `tests::patterns_agree_with_the_validators` holds them together.
pub const AGENT_ID_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F]*$";
pub const CONCEPT_PATH_PATTERN: &str = r"^[A-Za-z0-9._:-]{1,128}(/[A-Za-z0-9._:-]{1,128})*$";
pub const CONCEPT_PREFIX_PATTERN: &str = r"^([A-Za-z0-9._:-]{1,128}(/[A-Za-z0-9._:-]{1,128})*)?$";
pub const PREDICATE_PATTERN: &str = r"^[A-Za-z0-9._:-]{1,256}$";

/// A string schema: lengths in characters, a pattern and a description.
fn text_schema(
    min: Option<usize>,
    max: usize,
    pattern: &str,
    description: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(min)
        .max_length(Some(max))
        .pattern(Some(pattern))
        .description(Some(description))
        .into()
}

/// Declares a type that only names a text format in the API documents
/// (`#[schema(value_type = .., inline)]`); it is never built.
macro_rules! text_format {
    ($(#[$doc:meta])* $name:ident, $min:expr, $max:expr, $pattern:expr, $description:expr) => {
        $(#[$doc])*
        pub enum $name {}

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                text_schema($min, $max, $pattern, $description)
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

text_format!(
    /// An agent id ([`validate_agent_id`]).
    AgentIdText, Some(1), MAX_AGENT_ID_CHARS, AGENT_ID_PATTERN,
    "an agent id: 1-128 characters, no control characters"
);
text_format!(
    /// A client's request id (checked in [`AssertRequest::validate`]): as an agent id.
    RequestIdText, Some(1), MAX_REQUEST_ID_CHARS, AGENT_ID_PATTERN,
    "1-128 characters, no control characters"
);
text_format!(
    /// A concept path ([`validate_concept_path`]).
    ConceptPathText, None, MAX_CONCEPT_PATH_BYTES, CONCEPT_PATH_PATTERN,
    "`/`-separated segments of 1-128 `[A-Za-z0-9._:-]`, at most 1024 bytes"
);
text_format!(
    /// A concept prefix ([`validate_concept_prefix`]): a concept path, or empty for every path.
    ConceptPrefixText, None, MAX_CONCEPT_PATH_BYTES, CONCEPT_PREFIX_PATTERN,
    "a concept path, or empty for every path"
);
text_format!(
    /// A predicate ([`validate_predicate`]).
    PredicateText, None, MAX_PREDICATE_CHARS, PREDICATE_PATTERN,
    "1-256 characters of `[A-Za-z0-9._:-]`"
);

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// Checks a concept_path: `/`-separated segments of 1-128 `[A-Za-z0-9._:-]`, at most 1024 bytes.
pub fn validate_concept_path(path: &str) -> Result<(), ModelError> {
    let fail = |reason: &str| Err(ModelError::InvalidConceptPath { path: truncate(path), reason: reason.to_string() });
    if path.is_empty() {
        return fail("must not be empty");
    }
    if path.len() > MAX_CONCEPT_PATH_BYTES {
        return fail("longer than 1024 bytes");
    }
    if path.starts_with('/') || path.ends_with('/') {
        return fail("must not start or end with '/'");
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return fail("empty segment ('//')");
        }
        if segment.len() > MAX_SEGMENT_CHARS {
            return fail("segment longer than 128 characters");
        }
        if let Some(c) = segment.chars().find(|c| !is_name_char(*c)) {
            return fail(&format!("character {c:?} not allowed; use [A-Za-z0-9._:-]"));
        }
    }
    Ok(())
}

/// Checks a concept prefix: like a concept_path, but may be empty (everything).
pub fn validate_concept_prefix(prefix: &str) -> Result<(), ModelError> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_concept_path(prefix)
}

pub fn validate_predicate(predicate: &str) -> Result<(), ModelError> {
    let fail =
        |reason: &str| Err(ModelError::InvalidPredicate { predicate: truncate(predicate), reason: reason.to_string() });
    if predicate.is_empty() {
        return fail("must not be empty");
    }
    if predicate.len() > MAX_PREDICATE_CHARS {
        return fail("longer than 256 characters");
    }
    if let Some(c) = predicate.chars().find(|c| !is_name_char(*c)) {
        return fail(&format!("character {c:?} not allowed; use [A-Za-z0-9._:-]"));
    }
    Ok(())
}

pub fn validate_agent_id(agent_id: &str) -> Result<(), ModelError> {
    let count = agent_id.chars().count();
    if count == 0 || count > MAX_AGENT_ID_CHARS {
        return Err(ModelError::InvalidAgentId { reason: "must be 1-128 characters".into() });
    }
    if agent_id.chars().any(|c| c.is_control()) {
        return Err(ModelError::InvalidAgentId { reason: "must not contain control characters".into() });
    }
    Ok(())
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

/// `POST /v1/assert` body and one item of `POST /v1/assert/batch`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssertRequest {
    /// Slash-separated segments of 1-128 `[A-Za-z0-9._:-]`, at most 1024 bytes (docs/api.md),
    /// e.g. `projects/apollo`.
    #[schema(value_type = ConceptPathText, inline)]
    pub concept_path: String,
    /// What is claimed about the concept, e.g. `status`.
    #[schema(value_type = PredicateText, inline)]
    pub predicate: String,
    /// Any JSON value, at most `limits.max_value_bytes` and `limits.max_value_depth`.
    #[schema(value_type = serde_json::Value)]
    pub value: Box<RawValue>,
    /// Who claims it (default `anonymous`); an Ed25519 public key in hex for signed claims.
    #[serde(default)]
    #[schema(value_type = Option<AgentIdText>, inline)]
    pub agent_id: Option<String>,
    /// 0 to 1 (default 1).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub confidence: Option<f64>,
    /// Ids of earlier claims on the same concept that this one replaces.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub supersedes: Option<Vec<String>>,
    /// A JSON object saying where the claim comes from.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub source: Option<Box<RawValue>>,
    /// Hex Ed25519 signature over the canonical assertion bytes (docs/signatures.md).
    #[serde(default)]
    #[schema(pattern = r"^[0-9A-Fa-f]{1,256}$")]
    pub signature: Option<String>,
    /// An idempotency token: a retry with the same one is answered with the first outcome.
    #[serde(default)]
    #[schema(value_type = Option<RequestIdText>, inline)]
    pub request_id: Option<String>,
}

/// A validated assertion ready to be proposed to its shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssertionDraft {
    pub concept_path: String,
    pub predicate: String,
    pub value: Box<RawValue>,
    pub agent_id: String,
    pub confidence: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<AssertionId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Set only by the shard leader before proposing (DESIGN §2): why this claim is stored but
    /// kept out of the lenses. Clients cannot set it (`AssertRequest` has no such field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineDecision>,
}

/// The most a proposal puts into one Raft entry (estimated encoded bytes). A Raft entry is
/// replicated whole, inside the leader's heartbeat-sized AppendEntries timeout: a 1000-item
/// batch of 4 KB values (4 MB and more) could not reach a follower that had fallen behind.
pub const MAX_ENTRY_BYTES: usize = 1 << 20;

impl AssertionDraft {
    /// What this draft adds to an entry, roughly: its value, source and names, plus overhead.
    pub fn estimated_bytes(&self) -> usize {
        self.value.get().len()
            + self.source.as_ref().map_or(0, |s| s.get().len())
            + self.concept_path.len()
            + self.predicate.len()
            + self.agent_id.len()
            + self.signature.as_ref().map_or(0, String::len)
            + self.request_id.as_ref().map_or(0, String::len)
            + self.supersedes.len() * 28
            + 160
    }

    /// A draft for tests: `value` is the raw JSON of the value.
    #[cfg(test)]
    pub fn for_test(concept_path: &str, predicate: &str, agent_id: &str, value: &str) -> AssertionDraft {
        AssertionDraft {
            concept_path: concept_path.into(),
            predicate: predicate.into(),
            value: RawValue::from_string(value.to_string()).expect("raw JSON"),
            agent_id: agent_id.into(),
            confidence: 1.0,
            supersedes: vec![],
            source: None,
            signature: None,
            request_id: None,
            quarantine: None,
        }
    }
}

/// Why the shard leader quarantined a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuarantineDecision {
    /// `circuit_breaker_open`, `authority_required` or `contradicts_protected_claim`.
    pub reason: String,
    pub detail: String,
}

/// What a value may be: `limits.max_value_bytes` and `limits.max_value_depth`.
#[derive(Debug, Clone, Copy)]
pub struct ValueLimits {
    pub max_bytes: usize,
    pub max_depth: usize,
}

/// How deeply arrays and objects nest in `json` (valid JSON: the parser checked it): 0 for a
/// scalar, 1 for `[1]` or `{}`. One pass, no recursion, whatever the depth; brackets inside
/// strings do not count.
pub fn json_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for byte in json.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

impl AssertRequest {
    /// Applies every validation rule that needs no stored data.
    pub fn validate(self, limits: ValueLimits, shards: u16) -> Result<AssertionDraft, ModelError> {
        validate_concept_path(&self.concept_path)?;
        validate_predicate(&self.predicate)?;
        let value_bytes = self.value.get().len();
        if value_bytes > limits.max_bytes {
            return Err(ModelError::ValueTooLarge { bytes: value_bytes, limit: limits.max_bytes });
        }
        let fields =
            std::iter::once(("value", self.value.get())).chain(self.source.as_ref().map(|s| ("source", s.get())));
        for (field, raw) in fields {
            let depth = json_depth(raw);
            if depth > limits.max_depth {
                return Err(ModelError::ValueTooDeep { field: field.into(), depth, limit: limits.max_depth });
            }
        }
        let agent_id = self.agent_id.unwrap_or_else(|| DEFAULT_AGENT_ID.to_string());
        validate_agent_id(&agent_id)?;
        let confidence = self.confidence.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&confidence) {
            return Err(ModelError::InvalidConfidence { confidence });
        }
        let supersedes_text = self.supersedes.unwrap_or_default();
        if supersedes_text.len() > MAX_SUPERSEDES {
            return Err(ModelError::TooManySupersedes { count: supersedes_text.len() });
        }
        let shard = super::id::shard_for_path(&self.concept_path, shards);
        let mut supersedes = Vec::with_capacity(supersedes_text.len());
        for text in &supersedes_text {
            let id = AssertionId::parse(text).map_err(|e| ModelError::InvalidId { id: e.0 })?;
            // A different shard means a different concept_path: refuse before proposing.
            if id.shard() != shard {
                return Err(ModelError::SupersedesOtherConcept { id: id.to_string() });
            }
            if !supersedes.contains(&id) {
                supersedes.push(id);
            }
        }
        if let Some(source) = &self.source {
            let raw = source.get();
            if raw.len() > MAX_SOURCE_BYTES {
                return Err(ModelError::SourceTooLarge { bytes: raw.len(), limit: MAX_SOURCE_BYTES });
            }
            if !raw.trim_start().starts_with('{') {
                return Err(ModelError::InvalidSource);
            }
        }
        if let Some(signature) = &self.signature {
            if signature.is_empty() || signature.len() > 256 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ModelError::InvalidSignatureFormat);
            }
        }
        if let Some(request_id) = &self.request_id {
            let count = request_id.chars().count();
            if count == 0 || count > MAX_REQUEST_ID_CHARS || request_id.chars().any(|c| c.is_control()) {
                return Err(ModelError::InvalidRequestId);
            }
        }
        Ok(AssertionDraft {
            concept_path: self.concept_path,
            predicate: self.predicate,
            value: self.value,
            agent_id,
            confidence,
            supersedes,
            source: self.source,
            signature: self.signature,
            request_id: self.request_id,
            quarantine: None,
        })
    }
}

/// An assertion as the state machine stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredAssertion {
    pub id: AssertionId,
    pub asserted_at_us: u64,
    pub log_index: u64,
    /// Nested, not flattened: serde's flatten cannot carry the raw JSON value.
    pub draft: AssertionDraft,
    /// Set by the shard leader before proposing (DESIGN §2 quarantine); never changed in place.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quarantined: bool,
}

impl StoredAssertion {
    /// This record with its draft borrowed.
    pub fn as_new(&self) -> NewAssertion<'_> {
        NewAssertion {
            id: self.id,
            asserted_at_us: self.asserted_at_us,
            log_index: self.log_index,
            draft: &self.draft,
            quarantined: self.quarantined,
        }
    }
}

/// A stored assertion with its draft borrowed: what an apply stores, from the log entry that
/// carries the draft, encoded from it (`codec::direct::encode_record`). Most of a large
/// batch's claims are on concepts no cache holds; only those that are get a copy
/// ([`NewAssertion::to_stored`]).
#[derive(Debug, Clone, Copy)]
pub struct NewAssertion<'a> {
    pub id: AssertionId,
    pub asserted_at_us: u64,
    pub log_index: u64,
    pub draft: &'a AssertionDraft,
    pub quarantined: bool,
}

impl NewAssertion<'_> {
    pub fn to_stored(&self) -> StoredAssertion {
        StoredAssertion {
            id: self.id,
            asserted_at_us: self.asserted_at_us,
            log_index: self.log_index,
            draft: self.draft.clone(),
            quarantined: self.quarantined,
        }
    }
}

/// A vote on an assertion.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoteRequest {
    #[schema(value_type = AssertionId)]
    pub assertion_id: String,
    #[serde(default)]
    #[schema(value_type = Option<AgentIdText>, inline)]
    pub agent_id: Option<String>,
    /// 1 (up) or -1 (down).
    pub value: i64,
    /// Hex Ed25519 signature over the canonical vote bytes (docs/signatures.md).
    #[serde(default)]
    pub signature: Option<String>,
}

/// A retraction of an assertion.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetractRequest {
    #[schema(value_type = AssertionId)]
    pub assertion_id: String,
    #[serde(default)]
    #[schema(value_type = Option<AgentIdText>, inline)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Hex Ed25519 signature over the canonical retraction bytes (docs/signatures.md).
    #[serde(default)]
    pub signature: Option<String>,
}

pub const MAX_REASON_CHARS: usize = 1024;

/// Derived status of an assertion at some time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    Superseded,
    Retracted,
    Quarantined,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON nested `depth` levels with strings full of brackets and escapes in between.
    fn nested(depth: usize, noise: &str) -> String {
        let mut json = String::new();
        for level in 0..depth {
            json.push_str(if level % 2 == 0 { "[" } else { "{\"k\":" });
            json.push_str(&format!("{},", serde_json::to_string(noise).expect("a string")).repeat(level % 2 ^ 1));
        }
        json.push('1');
        for level in (0..depth).rev() {
            json.push(if level % 2 == 0 { ']' } else { '}' });
        }
        json
    }

    proptest::proptest! {
        /// The one-pass depth equals the depth the JSON was built with, whatever brackets,
        /// quotes and backslashes its strings hold, and the JSON is valid.
        #[test]
        fn json_depth_counts_nesting_not_strings(depth in 0usize..200, noise in ".{0,12}") {
            let json = nested(depth, &noise);
            proptest::prop_assert!(serde_json::from_str::<Box<serde_json::value::RawValue>>(&json).is_ok() || depth > 120, "{}", json);
            proptest::prop_assert_eq!(json_depth(&json), depth);
        }
    }

    #[test]
    fn json_depth_of_simple_values() {
        for (json, depth) in
            [("1", 0), ("\"[[[\"", 0), ("[]", 1), ("{}", 1), ("[[1],[2,[3]]]", 3), ("{\"a\\\"[\":[{}]}", 3)]
        {
            assert_eq!(json_depth(json), depth, "{json}");
        }
        let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
        assert_eq!(json_depth(&deep), 20_000);
        let request = |value: &str| -> AssertRequest {
            serde_json::from_str(&format!(r#"{{"concept_path":"a/b","predicate":"p","value":{value}}}"#))
                .expect("parses")
        };
        let limits = ValueLimits { max_bytes: 1 << 20, max_depth: 3 };
        assert!(request("[[[1]]]").validate(limits, 16).is_ok());
        assert!(matches!(
            request("[[[[1]]]]").validate(limits, 16),
            Err(ModelError::ValueTooDeep { depth: 4, limit: 3, .. })
        ));
    }

    #[test]
    fn concept_paths() {
        for ok in ["a", "test/disk", "a.b_c:d-e/f", &"x".repeat(128)] {
            assert!(validate_concept_path(ok).is_ok(), "{ok}");
        }
        let long_path = vec!["y".repeat(100); 11].join("/");
        for bad in ["", "/a", "a/", "a//b", "a b", "a/é", &"x".repeat(129), long_path.as_str(), "a\0b"] {
            assert!(validate_concept_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn predicates() {
        assert!(validate_predicate("space_ok").is_ok());
        assert!(validate_predicate("").is_err());
        assert!(validate_predicate("has space").is_err());
        assert!(validate_predicate("a/b").is_err());
        assert!(validate_predicate(&"p".repeat(257)).is_err());
    }

    fn request(json: &str) -> AssertRequest {
        serde_json::from_str(json).expect("parse")
    }

    #[test]
    fn validation_rules() {
        let ok = request(r#"{"concept_path":"a/b","predicate":"p","value":{"x":[1,2]}}"#)
            .validate(ValueLimits { max_bytes: 100, max_depth: 64 }, 16)
            .expect("ok");
        assert_eq!(ok.agent_id, DEFAULT_AGENT_ID);
        assert_eq!(ok.confidence, 1.0);
        assert!(matches!(
            request(r#"{"concept_path":"a/b","predicate":"p","value":"0123456789"}"#)
                .validate(ValueLimits { max_bytes: 5, max_depth: 64 }, 16),
            Err(ModelError::ValueTooLarge { .. })
        ));
        assert!(matches!(
            request(r#"{"concept_path":"a/b","predicate":"p","value":1,"confidence":1.5}"#)
                .validate(ValueLimits { max_bytes: 100, max_depth: 64 }, 16),
            Err(ModelError::InvalidConfidence { .. })
        ));
        assert!(matches!(
            request(r#"{"concept_path":"a/b","predicate":"p","value":1,"source":[1]}"#)
                .validate(ValueLimits { max_bytes: 100, max_depth: 64 }, 16),
            Err(ModelError::InvalidSource)
        ));
        assert!(matches!(
            request(r#"{"concept_path":"a/b","predicate":"p","value":1,"supersedes":["nope"]}"#)
                .validate(ValueLimits { max_bytes: 100, max_depth: 64 }, 16),
            Err(ModelError::InvalidId { .. })
        ));
        assert!(serde_json::from_str::<AssertRequest>(r#"{"concept_path":"a","predicate":"p","value":1,"valeu":2}"#)
            .is_err());
    }

    /// Text from a small alphabet that reaches every rule: name characters, `/`, other ASCII
    /// punctuation, C0 and C1 controls, and letters beyond ASCII.
    fn probe_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let chars = prop_oneof![
            8 => prop::sample::select(vec!['a', 'Z', '0', '.', '_', ':', '-']),
            3 => Just('/'),
            1 => prop::sample::select(vec![' ', '#', '?', '\n', '\u{1f}', '\u{7f}', '\u{85}', '\u{9f}', '\u{a0}', 'é', '名']),
        ];
        prop_oneof![
            4 => proptest::collection::vec(chars.clone(), 0..12),
            1 => proptest::collection::vec(chars, 100..300),
        ]
        .prop_map(|chars| chars.into_iter().collect())
    }

    /// What the API documents' schema of a format accepts: its pattern and its lengths in
    /// characters (JSON Schema's code points).
    fn schema_accepts(schema: utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>, text: &str) -> bool {
        let utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(object)) = schema else {
            panic!("a text format is an inline string schema");
        };
        let chars = text.chars().count();
        let pattern = object.pattern.as_deref().expect("a pattern");
        regex::Regex::new(pattern).expect("the pattern compiles").is_match(text)
            && object.min_length.is_none_or(|min| chars >= min)
            && object.max_length.is_none_or(|max| chars <= max)
    }

    proptest::proptest! {
        /// Each format's schema in the API documents accepts exactly what its validator does, so
        /// a client that follows the documents is not refused and the contract tests' rejection
        /// check holds.
        #[test]
        fn patterns_agree_with_the_validators(text in probe_text()) {
            use utoipa::PartialSchema;
            proptest::prop_assert_eq!(schema_accepts(AgentIdText::schema(), &text), validate_agent_id(&text).is_ok());
            proptest::prop_assert_eq!(schema_accepts(ConceptPathText::schema(), &text), validate_concept_path(&text).is_ok());
            proptest::prop_assert_eq!(schema_accepts(ConceptPrefixText::schema(), &text), validate_concept_prefix(&text).is_ok());
            proptest::prop_assert_eq!(schema_accepts(PredicateText::schema(), &text), validate_predicate(&text).is_ok());
            let request = AssertRequest {
                request_id: Some(text.clone()),
                ..serde_json::from_str(r#"{"concept_path": "a", "predicate": "p", "value": 1}"#).expect("a request")
            };
            let limits = ValueLimits { max_bytes: 1 << 16, max_depth: 32 };
            proptest::prop_assert_eq!(schema_accepts(RequestIdText::schema(), &text), request.validate(limits, 16).is_ok());
        }

        /// An assertion id's schema accepts exactly what `AssertionId::parse` does.
        #[test]
        fn the_id_pattern_agrees_with_the_parser(text in "[0-9A-Za-z]{25,27}") {
            use utoipa::PartialSchema;
            let utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(object)) = AssertionId::schema() else {
                panic!("an inline string schema");
            };
            let pattern = regex::Regex::new(object.pattern.as_deref().expect("a pattern")).expect("compiles");
            proptest::prop_assert_eq!(pattern.is_match(&text), AssertionId::parse(&text).is_ok());
        }
    }
}
