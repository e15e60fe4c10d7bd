//! A group's membership change ([`GroupAdmin`]) in its protobuf form, and the AdminGroup
//! request that carries it to the group's leader.

use stemedb_proto::raft as pb;

use super::{missing, WireError};
use crate::raft::types::{GroupAdmin, GroupId};

pub fn admin_to_proto(group_id: GroupId, change: &GroupAdmin) -> pb::AdminGroupRequest {
    pb::AdminGroupRequest { group_id, change: Some(change_to_proto(change)) }
}

pub fn admin_from_proto(request: pb::AdminGroupRequest) -> Result<GroupAdmin, WireError> {
    change_from_proto(missing(request.change, "admin_group.change")?)
}

pub fn change_to_proto(change: &GroupAdmin) -> pb::GroupAdmin {
    use pb::group_admin::{AddVoter, Kind, RemoveMember, TransferLeader};
    let kind = match change {
        GroupAdmin::AddVoter { node, addr } => Kind::AddVoter(AddVoter { node: *node, addr: addr.clone() }),
        GroupAdmin::RemoveNode { node } => Kind::RemoveNode(RemoveMember { node: *node }),
        GroupAdmin::TransferLeader { target } => Kind::TransferLeader(TransferLeader { target: *target }),
    };
    pb::GroupAdmin { kind: Some(kind) }
}

pub fn change_from_proto(change: pb::GroupAdmin) -> Result<GroupAdmin, WireError> {
    use pb::group_admin::Kind;
    Ok(match missing(change.kind, "group admin")? {
        Kind::AddVoter(c) => GroupAdmin::AddVoter { node: c.node, addr: c.addr },
        Kind::RemoveNode(c) => GroupAdmin::RemoveNode { node: c.node },
        Kind::TransferLeader(c) => GroupAdmin::TransferLeader { target: c.target },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Every kind of membership change, any field values.
    pub(crate) fn group_admin() -> impl Strategy<Value = GroupAdmin> {
        prop_oneof![
            (any::<u64>(), "\\PC{0,24}").prop_map(|(node, addr)| GroupAdmin::AddVoter { node, addr }),
            any::<u64>().prop_map(|node| GroupAdmin::RemoveNode { node }),
            any::<u64>().prop_map(|target| GroupAdmin::TransferLeader { target }),
        ]
    }

    proptest! {
        /// `GroupAdmin` is not serializable: changes compare by their Debug form.
        #[test]
        fn every_change_round_trips(change in group_admin(), group in any::<u32>()) {
            let bytes = prost::Message::encode_to_vec(&admin_to_proto(group, &change));
            let message: pb::AdminGroupRequest = prost::Message::decode(bytes.as_slice()).expect("decode");
            prop_assert_eq!(message.group_id, group);
            let decoded = admin_from_proto(message).expect("a change");
            prop_assert_eq!(format!("{change:?}"), format!("{decoded:?}"));
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(message) = <pb::AdminGroupRequest as prost::Message>::decode(bytes.as_slice()) {
                let _ = admin_from_proto(message);
            }
        }
    }

    #[test]
    fn a_missing_change_is_named() {
        let request = pb::AdminGroupRequest { group_id: 1, change: None };
        assert!(matches!(admin_from_proto(request), Err(WireError::Missing("admin_group.change"))));
        let empty = pb::AdminGroupRequest { group_id: 1, change: Some(pb::GroupAdmin { kind: None }) };
        assert!(matches!(admin_from_proto(empty), Err(WireError::Missing("group admin"))));
    }
}
