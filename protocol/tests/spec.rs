//! SPEC.md must state the limits the code enforces: each named constant appears in the
//! spec as "`NAME` = value" (value with thousands separators).

use kkachi_protocol::{card, content, envelope, file, lan, session, wire};

fn with_commas(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn spec_states_the_limits_the_code_enforces() {
    let spec = include_str!("../SPEC.md");
    let limits: &[(&str, u64)] = &[
        ("MAX_CARD_LEN", card::MAX_CARD_LEN as u64),
        ("MAX_BEACON_ENTRIES", lan::MAX_BEACON_ENTRIES as u64),
        ("BEACON_SLOT_SECS", lan::BEACON_SLOT_SECS),
        ("CARD_LIFETIME_SECS", card::CARD_LIFETIME_SECS),
        ("MAX_INVITE_LEN", card::MAX_INVITE_LEN as u64),
        ("MAX_PAYLOAD_LEN", envelope::MAX_PAYLOAD_LEN as u64),
        ("MAX_SEALED_BODY", session::MAX_SEALED_BODY as u64),
        ("MAX_COUNTERS", session::MAX_COUNTERS),
        ("REKEY_AFTER_MESSAGES", session::REKEY_AFTER_MESSAGES),
        ("RETIRED_GRACE_SECS", session::RETIRED_GRACE_SECS),
        ("MAX_FRAME_LEN", wire::MAX_FRAME_LEN as u64),
        ("MAX_TEXT_LEN", content::MAX_TEXT_LEN as u64),
        ("MAX_REACTION_LEN", content::MAX_REACTION_LEN as u64),
        ("MAX_GROUP_CARDS", content::MAX_GROUP_CARDS as u64),
        ("CHUNK_BYTES", file::CHUNK_BYTES as u64),
        ("MAX_CHUNKS", file::MAX_CHUNKS as u64),
        ("MAX_NAME_BYTES", file::MAX_NAME_BYTES as u64),
        ("MAX_MIME_BYTES", file::MAX_MIME_BYTES as u64),
        ("MAX_THUMBNAIL_BYTES", file::MAX_THUMBNAIL_BYTES as u64),
        ("FORWARD_PERIOD_SECS", file::FORWARD_PERIOD_SECS),
        ("MAX_DEVICES", kkachi_protocol::device::MAX_DEVICES as u64),
        (
            "MAX_EDIT_RECORDS",
            kkachi_protocol::device::MAX_EDIT_RECORDS as u64,
        ),
        (
            "MAX_DEVICE_RECORDS",
            kkachi_protocol::device::MAX_DEVICE_RECORDS as u64,
        ),
        (
            "MAX_DEVICE_SET_LEN",
            kkachi_protocol::device::MAX_DEVICE_SET_LEN as u64,
        ),
        ("MAX_BODY_LEN", content::MAX_BODY_LEN as u64),
        (
            "MAX_LINK_CODE_LEN",
            kkachi_protocol::link::MAX_LINK_CODE_LEN as u64,
        ),
        (
            "MAX_LINK_CHUNK",
            kkachi_protocol::link::MAX_LINK_CHUNK as u64,
        ),
        (
            "MAX_LINK_RELAY_LEN",
            kkachi_protocol::link::MAX_LINK_RELAY_LEN as u64,
        ),
        (
            "MAX_LINK_RELAYED",
            kkachi_protocol::link::MAX_LINK_RELAYED as u64,
        ),
        ("MAX_PUT_BATCH", wire::MAX_PUT_BATCH as u64),
        ("MAX_BATCH_ITEMS", wire::MAX_BATCH_ITEMS as u64),
        ("MAX_DELETE_IDS", wire::MAX_DELETE_IDS as u64),
        ("MAX_GRANT_IDS", wire::MAX_GRANT_IDS as u64),
        ("MAX_CHUNK_IDS", wire::MAX_CHUNK_IDS as u64),
        ("MAX_WAIT_MS", u64::from(wire::MAX_WAIT_MS)),
        ("CLOCK_SKEW_SECS", envelope::CLOCK_SKEW_SECS),
        ("MAX_NAME_CHARS", card::MAX_NAME_CHARS as u64),
        ("MAX_OP_LEN", kkachi_protocol::group::MAX_OP_LEN as u64),
        ("MAX_LOG_OPS", kkachi_protocol::group::MAX_LOG_OPS as u64),
        (
            "MAX_OPS_PER_AUTHOR",
            kkachi_protocol::group::MAX_OPS_PER_AUTHOR as u64,
        ),
        (
            "MAX_VOID_ROUNDS",
            kkachi_protocol::group::MAX_VOID_ROUNDS as u64,
        ),
        ("MAX_MEMBERS", kkachi_protocol::group::MAX_MEMBERS as u64),
        (
            "MAX_GROUP_RELAYS",
            kkachi_protocol::group::MAX_GROUP_RELAYS as u64,
        ),
        ("MAX_WRAPS", kkachi_protocol::group::large::MAX_WRAPS as u64),
        (
            "MAX_KEY_PARTS",
            kkachi_protocol::group::large::MAX_KEY_PARTS as u64,
        ),
        (
            "MAX_POST_OPS",
            kkachi_protocol::group::large::MAX_POST_OPS as u64,
        ),
        (
            "MAX_HAVE_AUTHORS",
            kkachi_protocol::group::large::MAX_HAVE_AUTHORS as u64,
        ),
        (
            "EPOCHS_READ",
            kkachi_protocol::group::large::EPOCHS_READ as u64,
        ),
        (
            "MAX_POST_LEN",
            kkachi_protocol::group::large::MAX_POST_LEN as u64,
        ),
        (
            "SMALL_GROUP_MAX",
            kkachi_protocol::group::SMALL_GROUP_MAX as u64,
        ),
        (
            "MAX_FIRST_GENERATION",
            u64::from(session::MAX_FIRST_GENERATION),
        ),
        (
            "MAX_GENERATION_STEP",
            u64::from(session::MAX_GENERATION_STEP),
        ),
    ];
    let mut missing = Vec::new();
    for (name, value) in limits {
        let needle = format!("`{name}` = {}", with_commas(*value));
        if !spec.contains(&needle) {
            missing.push(needle);
        }
    }
    assert!(
        missing.is_empty(),
        "SPEC.md lacks or misstates: {missing:#?}"
    );
    let classes = session::SIZE_CLASSES.map(|c| c.to_string()).join(", ");
    assert!(
        spec.contains(&format!("SIZE_CLASSES = {classes} bytes")),
        "SPEC.md lacks or misstates SIZE_CLASSES = {classes} bytes"
    );
    assert!(spec.contains(session::NOISE_PARAMS));
    assert!(spec.contains(wire::SESSION_PROTOCOL_NAME));
}
