//! The protobuf bytes of assertion commands and stored assertions, written straight from the
//! Rust values. They are the same bytes prost writes for the messages `command_to_proto` and
//! `record_to_proto` build (the property tests below compare them), without building those
//! messages first. Building them copies every string of every draft into a fresh `String`, only
//! to copy it again into the output and free it: an entry of 1,000 assertions is thousands of
//! allocations, paid for the log on every replica and for every record the apply stores.
//! A command is measured once ([`Measured`]: the length of each nested message, in the order
//! they are written) and then written. Commands other than assertions (small, and rare on the
//! write path) are still built as messages, once. Decoding stays prost's (`command_from_proto`,
//! `decode_assertion`).

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;

use super::{command_to_proto, RECORD_V1};
use crate::model::assertion::{AssertionDraft, NewAssertion};
use crate::shard::command::ShardCommand;

/// `AssertionDraft.supersedes` items and `StoredAssertion.id`: 16 bytes each.
const ID_BYTES: usize = 16;

/// A command measured for writing: the length of every message nested in it, in the order
/// they are written (each measured once), and the bytes of the commands that are not assertion
/// commands (built as prost messages once).
pub struct Measured<'a> {
    command: &'a ShardCommand,
    lens: Vec<usize>,
    others: Vec<Vec<u8>>,
}

impl<'a> Measured<'a> {
    pub fn new(command: &'a ShardCommand) -> Measured<'a> {
        let mut measured = Measured { command, lens: Vec::with_capacity(4 + command.item_count()), others: Vec::new() };
        measure(command, &mut measured.lens, &mut measured.others);
        measured
    }

    /// The length of the protobuf `Command`.
    pub fn encoded_len(&self) -> usize {
        self.lens[0]
    }

    /// Its length as the message field `tag` of another message.
    pub fn field_len(&self, tag: u32) -> usize {
        message_field_len(tag, self.encoded_len())
    }

    /// Appends the `Command` (without a length prefix).
    pub fn write(&self, out: &mut Vec<u8>) {
        write_command(self.command, &mut Cursor { lens: &self.lens, at: 0 }, &mut self.others.iter(), out);
    }

    /// Appends it as the message field `tag`: its key, its length and the `Command`.
    pub fn write_field(&self, tag: u32, out: &mut Vec<u8>) {
        put_message_head(tag, self.encoded_len(), out);
        self.write(out);
    }
}

/// Pushes the length of the `Command` of `command`, then those of its nested messages, in the
/// order [`write_command`] writes them; returns the first.
fn measure(command: &ShardCommand, lens: &mut Vec<usize>, others: &mut Vec<Vec<u8>>) -> usize {
    let slot = lens.len();
    lens.push(0);
    let body = match command {
        ShardCommand::Assert { proposed_at_us, items } => {
            let assert_slot = lens.len();
            lens.push(0);
            let mut assert = u64_len(1, *proposed_at_us);
            for draft in items {
                let len = draft_len(draft);
                lens.push(len);
                assert += message_field_len(2, len);
            }
            lens[assert_slot] = assert;
            message_field_len(1, assert)
        }
        ShardCommand::Once { token, command } => {
            let once_slot = lens.len();
            lens.push(0);
            let inner = measure(command, lens, others);
            let once = u64_len(1, token.issued_at_us) + u64_len(2, token.nonce) + message_field_len(3, inner);
            lens[once_slot] = once;
            message_field_len(7, once)
        }
        ShardCommand::Parts { parts } => {
            let parts_slot = lens.len();
            lens.push(0);
            let body = parts.iter().map(|part| message_field_len(1, measure(part, lens, others))).sum();
            lens[parts_slot] = body;
            message_field_len(9, body)
        }
        other => {
            let bytes = command_to_proto(other).encode_to_vec();
            let len = bytes.len();
            others.push(bytes);
            len
        }
    };
    lens[slot] = body;
    body
}

/// The lengths [`measure`] pushed, read back in the same order.
struct Cursor<'a> {
    lens: &'a [usize],
    at: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> usize {
        let len = self.lens.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        len
    }

    fn peek(&self) -> usize {
        self.lens.get(self.at).copied().unwrap_or(0)
    }
}

/// Appends the `Command` of `command` (without a length prefix), taking its lengths from
/// `lens` and the bytes of other commands from `others`.
fn write_command<'b>(
    command: &ShardCommand,
    lens: &mut Cursor<'_>,
    others: &mut impl Iterator<Item = &'b Vec<u8>>,
    out: &mut Vec<u8>,
) {
    lens.next(); // this Command's own length, written by the caller
    match command {
        ShardCommand::Assert { proposed_at_us, items } => {
            put_message_head(1, lens.next(), out);
            put_u64(1, *proposed_at_us, out);
            for draft in items {
                put_message_head(2, lens.next(), out);
                encode_draft(draft, out);
            }
        }
        ShardCommand::Once { token, command } => {
            put_message_head(7, lens.next(), out);
            put_u64(1, token.issued_at_us, out);
            put_u64(2, token.nonce, out);
            put_message_head(3, lens.peek(), out);
            write_command(command, lens, others, out);
        }
        ShardCommand::Parts { parts } => {
            put_message_head(9, lens.next(), out);
            for part in parts {
                put_message_head(1, lens.peek(), out);
                write_command(part, lens, others, out);
            }
        }
        _ => {
            if let Some(bytes) = others.next() {
                out.extend_from_slice(bytes);
            }
        }
    }
}

/// The stored form of an assertion: [`RECORD_V1`], then the protobuf `StoredAssertion`
/// (`codec::encode_assertion`), from the record with its draft borrowed.
pub fn encode_record(record: &NewAssertion<'_>) -> Vec<u8> {
    let NewAssertion { id, asserted_at_us, log_index, draft, quarantined } = *record;
    let draft_bytes = draft_len(draft);
    let len = bytes_len(1, ID_BYTES)
        + u64_len(2, asserted_at_us)
        + u64_len(3, log_index)
        + message_field_len(4, draft_bytes)
        + if quarantined { key_len(5) + 1 } else { 0 };
    let mut out = Vec::with_capacity(1 + len);
    out.push(RECORD_V1);
    put_bytes(1, &id.to_bytes(), &mut out);
    put_u64(2, asserted_at_us, &mut out);
    put_u64(3, log_index, &mut out);
    put_message_head(4, draft_bytes, &mut out);
    encode_draft(draft, &mut out);
    if quarantined {
        encode_key(5, WireType::Varint, &mut out);
        encode_varint(1, &mut out);
    }
    out
}

fn draft_len(draft: &AssertionDraft) -> usize {
    str_len(1, &draft.concept_path)
        + str_len(2, &draft.predicate)
        + str_len(3, draft.value.get())
        + str_len(4, &draft.agent_id)
        + if draft.confidence.to_bits() != 0 { key_len(5) + 8 } else { 0 }
        + draft.supersedes.len() * bytes_len(6, ID_BYTES)
        + draft.source.as_ref().map_or(0, |s| bytes_len(7, s.get().len()))
        + draft.signature.as_ref().map_or(0, |s| bytes_len(8, s.len()))
        + draft.request_id.as_ref().map_or(0, |s| bytes_len(9, s.len()))
        + draft.quarantine.as_ref().map_or(0, |q| message_field_len(10, str_len(1, &q.reason) + str_len(2, &q.detail)))
}

fn encode_draft(draft: &AssertionDraft, out: &mut Vec<u8>) {
    put_str(1, &draft.concept_path, out);
    put_str(2, &draft.predicate, out);
    put_str(3, draft.value.get(), out);
    put_str(4, &draft.agent_id, out);
    let bits = draft.confidence.to_bits();
    if bits != 0 {
        encode_key(5, WireType::SixtyFourBit, out);
        out.extend_from_slice(&bits.to_le_bytes());
    }
    for id in &draft.supersedes {
        put_bytes(6, &id.to_bytes(), out);
    }
    // Optional fields: written when present, even empty.
    if let Some(source) = &draft.source {
        put_bytes(7, source.get().as_bytes(), out);
    }
    if let Some(signature) = &draft.signature {
        put_bytes(8, signature.as_bytes(), out);
    }
    if let Some(request_id) = &draft.request_id {
        put_bytes(9, request_id.as_bytes(), out);
    }
    if let Some(q) = &draft.quarantine {
        put_message_head(10, str_len(1, &q.reason) + str_len(2, &q.detail), out);
        put_str(1, &q.reason, out);
        put_str(2, &q.detail, out);
    }
}

/// A proto3 scalar at its default is not written.
fn u64_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value)
    }
}

fn put_u64(tag: u32, value: u64, out: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(value, out);
    }
}

fn str_len(tag: u32, text: &str) -> usize {
    if text.is_empty() {
        0
    } else {
        bytes_len(tag, text.len())
    }
}

fn put_str(tag: u32, text: &str, out: &mut Vec<u8>) {
    if !text.is_empty() {
        put_bytes(tag, text.as_bytes(), out);
    }
}

/// A length-delimited field that is written whatever its length (optional, repeated, or a
/// message).
fn bytes_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_bytes(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn message_field_len(tag: u32, body: usize) -> usize {
    bytes_len(tag, body)
}

fn put_message_head(tag: u32, body: usize, out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(body as u64, out);
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::super::tests::{command, draft, record, same};
    use super::super::{command_from_proto, frame, record_to_proto};
    use super::*;
    use crate::model::assertion::StoredAssertion;
    use crate::model::id::AssertionId;
    use crate::shard::command::ProposalToken;

    fn prost_bytes(command: &ShardCommand) -> Vec<u8> {
        command_to_proto(command).encode_to_vec()
    }

    fn direct_bytes(command: &ShardCommand) -> Vec<u8> {
        let mut out = Vec::new();
        Measured::new(command).write(&mut out);
        out
    }

    /// Commands with assertions at every depth the log holds: alone, in a token, and as parts
    /// of an entry (themselves alone or in tokens).
    pub(crate) fn assertion_command() -> impl Strategy<Value = ShardCommand> {
        /// Zero (not written at all), short and long varints.
        fn number() -> impl Strategy<Value = u64> {
            prop_oneof![Just(0u64), 1..300u64, any::<u64>()]
        }
        fn assert() -> impl Strategy<Value = ShardCommand> {
            (number(), proptest::collection::vec(draft(), 0..5))
                .prop_map(|(proposed_at_us, items)| ShardCommand::Assert { proposed_at_us, items })
        }
        fn once() -> impl Strategy<Value = ShardCommand> {
            (number(), number(), assert()).prop_map(|(issued_at_us, nonce, command)| ShardCommand::Once {
                token: ProposalToken { issued_at_us, nonce },
                command: Box::new(command),
            })
        }
        let parts = proptest::collection::vec(prop_oneof![assert(), once()], 0..4)
            .prop_map(|parts| ShardCommand::Parts { parts });
        prop_oneof![assert(), once(), parts]
    }

    proptest! {
        #[test]
        fn assertion_commands_encode_as_prost_does(command in assertion_command()) {
            let direct = direct_bytes(&command);
            prop_assert_eq!(&direct, &prost_bytes(&command));
            prop_assert_eq!(direct.len(), Measured::new(&command).encoded_len());
        }

        /// Other commands go through their message; some hold maps, which prost writes in a
        /// `HashMap`'s order, so they are compared decoded.
        #[test]
        fn every_command_reads_back_from_its_bytes(command in command()) {
            let direct = direct_bytes(&command);
            prop_assert_eq!(direct.len(), Measured::new(&command).encoded_len());
            let decoded = command_from_proto(prost::Message::decode(direct.as_slice()).expect("decode"))
                .expect("a command");
            prop_assert!(same(&command, &decoded), "{:?} came back as {:?}", command, decoded);
        }

        #[test]
        fn records_encode_as_prost_does(record in record()) {
            prop_assert_eq!(encode_record(&record.as_new()), frame(&record_to_proto(&record)));
        }
    }

    /// The fields proto3 leaves out at their defaults, and the optional ones it writes even
    /// when empty, are where a hand-written encoder goes wrong first.
    #[test]
    fn defaults_and_empty_optionals_encode_as_prost_does() {
        let mut draft = AssertionDraft::for_test("", "", "writer", "0");
        draft.agent_id = String::new();
        for confidence in [0.0, -0.0, 1.0] {
            draft.confidence = confidence;
            draft.source = Some(serde_json::value::RawValue::from_string("{}".into()).expect("json"));
            draft.signature = Some(String::new());
            draft.request_id = Some(String::new());
            draft.quarantine =
                Some(crate::model::assertion::QuarantineDecision { reason: String::new(), detail: String::new() });
            for proposed_at_us in [0, 1, u64::MAX] {
                let command = ShardCommand::Assert { proposed_at_us, items: vec![draft.clone(), draft.clone()] };
                assert_eq!(direct_bytes(&command), prost_bytes(&command));
                let token = ProposalToken { issued_at_us: 0, nonce: 0 };
                let once = ShardCommand::Once { token, command: Box::new(command) };
                assert_eq!(direct_bytes(&once), prost_bytes(&once));
            }
            let id = AssertionId::from_bytes(&[0; 16]).expect("16 bytes");
            let record =
                StoredAssertion { id, asserted_at_us: 0, log_index: 0, draft: draft.clone(), quarantined: false };
            assert_eq!(encode_record(&record.as_new()), frame(&record_to_proto(&record)));
        }
        let empty = ShardCommand::Parts { parts: Vec::new() };
        assert_eq!(direct_bytes(&empty), prost_bytes(&empty));
    }

    /// Lengths of three varint bytes and more, at every level: a 20,000-byte value, a command of
    /// 300 such drafts, in a token, as a part.
    #[test]
    fn long_messages_encode_as_prost_does() {
        let value = format!("\"{}\"", "v".repeat(20_000));
        let items: Vec<AssertionDraft> =
            (0..300).map(|i| AssertionDraft::for_test(&format!("long/{i}"), "p", "writer", &value)).collect();
        let assert = ShardCommand::Assert { proposed_at_us: 7, items };
        let once = ShardCommand::Once { token: ProposalToken::new(), command: Box::new(assert.clone()) };
        let parts = ShardCommand::Parts { parts: vec![assert.clone(), once.clone()] };
        for command in [assert, once, parts] {
            let direct = direct_bytes(&command);
            assert!(direct.len() > 6_000_000);
            assert_eq!(direct, prost_bytes(&command));
            assert_eq!(direct.len(), Measured::new(&command).encoded_len());
        }
    }
}
