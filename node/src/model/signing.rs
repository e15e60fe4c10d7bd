//! Ed25519 signatures over writes (DESIGN §2, `security.require_signatures`): the canonical
//! bytes of each kind of write, and their verification against the agent's public key (the
//! agent_id, 64 hex characters). docs/signatures.md documents the encoding with test vectors;
//! the tests below check the same vectors.
//!
//! Every message is a domain tag (`stemedb:<kind>:v1`), a zero byte, then fields, each a u32
//! big-endian byte length followed by the bytes. Absent optional fields are empty (no optional
//! field can be empty when present). Numbers that are not JSON use fixed binary forms.

use serde_json::Value;

use super::assertion::AssertionDraft;
use crate::error::ErrorCode;

/// Why a signature was refused. Each has a stable code; all are HTTP 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum SignatureError {
    #[error("security.require_signatures is on: this write needs a signature (hex Ed25519 over the canonical bytes; see docs/signatures.md)")]
    SignatureRequired,
    #[error("agent_id must be a hex Ed25519 public key (64 hex characters) to sign or verify: {reason}")]
    AgentIdNotPublicKey { reason: String },
    #[error("signature must be 128 hex characters (64 bytes)")]
    MalformedSignature,
    #[error("signature does not verify for agent_id over the canonical bytes of this {kind}")]
    #[serde(rename = "invalid_signature")]
    BadSignature { kind: &'static str },
}

impl SignatureError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SignatureError::SignatureRequired => ErrorCode::SignatureRequired,
            SignatureError::AgentIdNotPublicKey { .. } => ErrorCode::AgentIdNotPublicKey,
            SignatureError::MalformedSignature => ErrorCode::MalformedSignature,
            SignatureError::BadSignature { .. } => ErrorCode::InvalidSignature,
        }
    }
}

/// Builds a canonical message: tag, 0, then length-prefixed fields.
struct Message(Vec<u8>);

impl Message {
    fn new(kind: &str) -> Message {
        let mut bytes = format!("stemedb:{kind}:v1").into_bytes();
        bytes.push(0);
        Message(bytes)
    }

    fn field(mut self, bytes: &[u8]) -> Message {
        self.0.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }
}

/// JSON with object keys sorted (by their UTF-8 bytes), no insignificant whitespace, strings
/// escaped minimally, numbers as serde_json prints them (integers as plain decimals).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn canonical_raw(raw: &serde_json::value::RawValue) -> String {
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(value) => canonical_json(&value),
        Err(_) => raw.get().to_string(),
    }
}

/// The bytes an assertion's signature covers: concept_path, predicate, canonical value,
/// agent_id, confidence (IEEE-754 binary64, big-endian), supersedes (ids joined by ','),
/// canonical source (empty if absent), request_id (empty if absent).
pub fn assertion_bytes(draft: &AssertionDraft) -> Vec<u8> {
    let supersedes: Vec<String> = draft.supersedes.iter().map(|id| id.to_string()).collect();
    Message::new("assert")
        .field(draft.concept_path.as_bytes())
        .field(draft.predicate.as_bytes())
        .field(canonical_raw(&draft.value).as_bytes())
        .field(draft.agent_id.as_bytes())
        .field(&draft.confidence.to_bits().to_be_bytes())
        .field(supersedes.join(",").as_bytes())
        .field(draft.source.as_deref().map(canonical_raw).unwrap_or_default().as_bytes())
        .field(draft.request_id.as_deref().unwrap_or_default().as_bytes())
        .0
}

/// The bytes a vote's signature covers: assertion_id, agent_id, value (one byte: 0x01 or 0xff).
pub fn vote_bytes(assertion_id: &str, agent_id: &str, value: i8) -> Vec<u8> {
    Message::new("vote").field(assertion_id.as_bytes()).field(agent_id.as_bytes()).field(&[value as u8]).0
}

/// The bytes a retraction's signature covers: assertion_id, agent_id, reason (empty if absent).
pub fn retract_bytes(assertion_id: &str, agent_id: &str, reason: Option<&str>) -> Vec<u8> {
    Message::new("retract")
        .field(assertion_id.as_bytes())
        .field(agent_id.as_bytes())
        .field(reason.unwrap_or_default().as_bytes())
        .0
}

/// The bytes a grant's signature (by the grantor) covers: grantor, grantee, concept_prefix,
/// level (one byte).
pub fn grant_bytes(grantor: &str, grantee: &str, concept_prefix: &str, level: u8) -> Vec<u8> {
    Message::new("grant")
        .field(grantor.as_bytes())
        .field(grantee.as_bytes())
        .field(concept_prefix.as_bytes())
        .field(&[level])
        .0
}

/// The bytes a revocation's signature (by the grantor) covers: grant id (u64 big-endian),
/// grantor.
pub fn revoke_bytes(grant_id: u64, grantor: &str) -> Vec<u8> {
    Message::new("revoke").field(&grant_id.to_be_bytes()).field(grantor.as_bytes()).0
}

/// Parses an agent_id as an Ed25519 public key.
pub fn public_key(agent_id: &str) -> Result<ed25519_dalek::VerifyingKey, SignatureError> {
    // One spelling per key: with mixed case, one key holder could act as many agents.
    if agent_id.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(SignatureError::AgentIdNotPublicKey { reason: "hex must be lower-case".into() });
    }
    let bytes: [u8; 32] = hex::decode(agent_id)
        .map_err(|e| SignatureError::AgentIdNotPublicKey { reason: e.to_string() })?
        .try_into()
        .map_err(|_| SignatureError::AgentIdNotPublicKey { reason: "not 32 bytes".into() })?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| SignatureError::AgentIdNotPublicKey { reason: "not a valid curve point".into() })
}

/// Checks a write's signature. `required`: `security.require_signatures`. A signature that is
/// present is always checked, required or not.
pub fn verify(
    kind: &'static str,
    agent_id: &str,
    signature: Option<&str>,
    message: impl FnOnce() -> Vec<u8>,
    required: bool,
) -> Result<(), SignatureError> {
    let Some(signature) = signature else {
        return if required { Err(SignatureError::SignatureRequired) } else { Ok(()) };
    };
    let key = public_key(agent_id)?;
    let bytes: [u8; 64] =
        hex::decode(signature).ok().and_then(|b| b.try_into().ok()).ok_or(SignatureError::MalformedSignature)?;
    let signature = ed25519_dalek::Signature::from_bytes(&bytes);
    key.verify_strict(&message(), &signature).map_err(|_| SignatureError::BadSignature { kind })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::assertion::AssertRequest;
    use ed25519_dalek::Signer;

    /// The test key of docs/signatures.md: the secret key is 32 bytes of 0x01.
    fn test_key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[1u8; 32])
    }

    fn draft(json: &str) -> AssertionDraft {
        serde_json::from_str::<AssertRequest>(json)
            .expect("parse")
            .validate(crate::model::assertion::ValueLimits { max_bytes: 65536, max_depth: 64 }, 16)
            .expect("valid")
    }

    const PUBLIC_KEY: &str = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let value: Value =
            serde_json::from_str(r#"{ "b": [1, 2.5, "x\n"], "a": {"z": null, "y": true} }"#).expect("json");
        assert_eq!(canonical_json(&value), r#"{"a":{"y":true,"z":null},"b":[1,2.5,"x\n"]}"#);
    }

    #[test]
    fn test_vector_assertion() {
        let key = test_key();
        assert_eq!(hex::encode(key.verifying_key().as_bytes()), PUBLIC_KEY);
        let body = format!(
            r#"{{"concept_path":"test/disk","predicate":"space_ok","value":{{"free_gb": 12, "ok": true}},"agent_id":"{PUBLIC_KEY}","confidence":0.9}}"#
        );
        let draft = draft(&body);
        let bytes = assertion_bytes(&draft);
        assert_eq!(hex::encode(&bytes), EXPECTED_ASSERT_BYTES);
        let signature = hex::encode(key.sign(&bytes).to_bytes());
        assert_eq!(signature, EXPECTED_ASSERT_SIGNATURE);
        assert_eq!(verify("assertion", PUBLIC_KEY, Some(&signature), || bytes.clone(), true), Ok(()));
        // Any change to the content breaks it; so does another key.
        let mut tampered = draft.clone();
        tampered.confidence = 0.8;
        assert!(matches!(
            verify("assertion", PUBLIC_KEY, Some(&signature), || assertion_bytes(&tampered), true),
            Err(SignatureError::BadSignature { .. })
        ));
        let other = hex::encode(ed25519_dalek::SigningKey::from_bytes(&[2u8; 32]).verifying_key().as_bytes());
        assert!(verify("assertion", &other, Some(&signature), || bytes.clone(), true).is_err());
    }

    #[test]
    fn test_vector_vote() {
        let id = "01JDTESTTESTTESTTESTTESTTE";
        let bytes = vote_bytes(id, PUBLIC_KEY, -1);
        assert_eq!(hex::encode(&bytes), EXPECTED_VOTE_BYTES);
        assert_eq!(hex::encode(test_key().sign(&bytes).to_bytes()), EXPECTED_VOTE_SIGNATURE);
    }

    #[test]
    fn refusals() {
        assert_eq!(verify("vote", "ops-bot", None, Vec::new, false), Ok(()));
        assert_eq!(verify("vote", "ops-bot", None, Vec::new, true), Err(SignatureError::SignatureRequired));
        assert!(matches!(
            verify("vote", "ops-bot", Some("00"), Vec::new, false),
            Err(SignatureError::AgentIdNotPublicKey { .. })
        ));
        assert_eq!(verify("vote", PUBLIC_KEY, Some("abcd"), Vec::new, false), Err(SignatureError::MalformedSignature));
        assert!(matches!(
            verify("vote", &PUBLIC_KEY.to_uppercase(), Some("abcd"), Vec::new, false),
            Err(SignatureError::AgentIdNotPublicKey { .. })
        ));
    }

    const EXPECTED_ASSERT_BYTES: &str =
        "7374656d6564623a6173736572743a76310000000009746573742f6469736b0000000873706163655f6f6b000000187b22667265655f6762223a31322c226f6b223a747275657d0000004038613838653364643734303966313935666435326462326433636261356437326361363730396266316439343132316266333734383830316234306636663563000000083feccccccccccccd000000000000000000000000";
    const EXPECTED_ASSERT_SIGNATURE: &str =
        "c545715f5cdd730a5a5e33987bcdca8d9f3c5dece8045868dff0fb07829c7ae6881ed7ab8795a1d7855f351137bd1c9eb1eab5aa6bcf14f2c366898190462808";
    const EXPECTED_VOTE_BYTES: &str =
        "7374656d6564623a766f74653a7631000000001a30314a4454455354544553545445535454455354544553545445000000403861383865336464373430396631393566643532646232643363626135643732636136373039626631643934313231626633373438383031623430663666356300000001ff";
    const EXPECTED_VOTE_SIGNATURE: &str =
        "a02a0d87dcd15548d889a5451947b3e8071b5f09203e4e9736a484880b7dfb022ac4af524ea7a043a7a77cb9d68d2688f4b76c6dc96643c2225ad2d1289c6501";
}
