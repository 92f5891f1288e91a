use std::net::SocketAddr;

use multiaddr::Multiaddr;

use super::*;

fn addrs() -> Vec<SocketAddr> {
    vec![
        "127.0.0.1:7000".parse().expect("an address"),
        "[::1]:7001".parse().expect("an address"),
    ]
}

fn code() -> LinkCode {
    LinkCode::new([7u8; LINK_SECRET_LEN], addrs(), None).expect("a code")
}

/// Encodes `contents` as a code with a valid checksum (for codes this version never
/// makes).
fn raw_code(contents: &[u8]) -> String {
    let mut bytes = contents.to_vec();
    let sum = hash("kkachi/link-checksum/v1", &[contents]);
    bytes.extend_from_slice(&sum[..CHECKSUM_LEN]);
    format!("{LINK_PREFIX}{}", bs58::encode(bytes).into_string())
}

#[test]
fn known_answer_code_and_key() {
    // Fixed secret and addresses: any change to the layout, labels or alphabet shows.
    // (Both values were also computed apart from this code, from SPEC §15.1 alone.)
    let code = code();
    assert_eq!(
        code.encode(),
        "kkd13BnfcEa5aW45anvzWHer13RHGYjk249N6Hgmx7o3N17tGo5aosPRjrhbLQTVH2c9M"
    );
    assert_eq!(
        hex(&code.psk()),
        "37e30abad5beeddaee1e37fd04b5009b1206d90071a8c7d4d560c1714cf853f7"
    );
}

#[test]
fn known_answer_safety_number() {
    // Computed apart from this code, from SPEC §15.1 alone.
    assert_eq!(safety_number(&[1u8; 32], &[2u8; NONCE_LEN]), 31_634_530);
    assert_eq!(
        hex(&commitment(&[2u8; NONCE_LEN])),
        "d38ba0574f47e1476442316eeb426a8711fe61bf59dcfc164194d466496b0afc"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_code_reads_back_as_typed_with_spaces_and_line_breaks() {
    let code = code();
    let text = code.encode();
    let (a, b) = text.split_at(20);
    let typed = format!("  {a}\n {b} ");
    assert_eq!(LinkCode::parse(&typed).expect("reads"), code);
    assert_eq!(LinkCode::parse(&text).expect("reads").addrs(), &addrs()[..]);
}

#[test]
fn each_kind_of_bad_code_says_what_is_wrong() {
    let text = code().encode();
    assert!(matches!(
        LinkCode::parse(&text.replacen("kkd1", "kk1", 1)),
        Err(LinkError::InviteCode)
    ));
    assert!(matches!(
        LinkCode::parse(&text.replacen("kkd1", "kkx1", 1)),
        Err(LinkError::BadPrefix)
    ));
    assert!(matches!(
        LinkCode::parse(&format!("{text}0")),
        Err(LinkError::BadCharacters)
    ));
    // One character changed: the checksum catches it.
    let mut typo = text.clone().into_bytes();
    let last = typo.len() - 3;
    typo[last] = if typo[last] == b'2' { b'3' } else { b'2' };
    assert!(matches!(
        LinkCode::parse(&String::from_utf8(typo).expect("ascii")),
        Err(LinkError::BadChecksum)
    ));
    assert!(matches!(
        LinkCode::parse(&text[..text.len() - 5]),
        Err(LinkError::BadChecksum)
    ));
    let long = format!("{LINK_PREFIX}{}", "2".repeat(MAX_LINK_CODE_LEN));
    assert!(matches!(LinkCode::parse(&long), Err(LinkError::TooLong(_))));
    assert!(matches!(
        LinkCode::parse(&raw_code(&[2, 0])),
        Err(LinkError::Newer(2))
    ));
    let mut none = vec![LINK_VERSION];
    none.extend_from_slice(&[1; LINK_SECRET_LEN]);
    none.push(0);
    assert!(matches!(
        LinkCode::parse(&raw_code(&none)),
        Err(LinkError::Addresses(0))
    ));
    let mut family = none.clone();
    family.pop();
    family.extend_from_slice(&[1, 5, 1, 2, 3, 4, 0, 80]);
    assert!(matches!(
        LinkCode::parse(&raw_code(&family)),
        Err(LinkError::Decode(DecodeError::UnknownTag { .. }))
    ));
    let mut cut = none.clone();
    cut.pop();
    cut.extend_from_slice(&[1, 4, 1, 2, 3]);
    assert!(matches!(
        LinkCode::parse(&raw_code(&cut)),
        Err(LinkError::Decode(DecodeError::Truncated { .. }))
    ));
    let mut trailing = none;
    trailing.pop();
    trailing.extend_from_slice(&[1, 4, 1, 2, 3, 4, 0, 80, 9]);
    assert!(matches!(
        LinkCode::parse(&raw_code(&trailing)),
        Err(LinkError::Decode(DecodeError::TrailingBytes(1)))
    ));
}

#[test]
fn a_code_lists_one_to_eight_addresses() {
    let one: SocketAddr = "10.0.0.1:1".parse().expect("an address");
    assert!(matches!(
        LinkCode::new([0; LINK_SECRET_LEN], vec![], None),
        Err(LinkError::Addresses(0))
    ));
    assert!(matches!(
        LinkCode::new([0; LINK_SECRET_LEN], vec![one; MAX_LINK_ADDRS + 1], None),
        Err(LinkError::Addresses(9))
    ));
    let v6: SocketAddr = "[2001:db8::1]:65535".parse().expect("an address");
    let most =
        LinkCode::new([0xff; LINK_SECRET_LEN], vec![v6; MAX_LINK_ADDRS], None).expect("fits");
    let text = most.encode();
    assert!(text.len() <= MAX_LINK_CODE_LEN, "{} characters", text.len());
    assert_eq!(LinkCode::parse(&text).expect("reads"), most);
}

/// A relay address as the reference client puts it in a code.
fn relay() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
        .parse()
        .expect("a multiaddr")
}

#[test]
fn known_answer_code_with_a_relay_and_its_queues() {
    // Computed apart from this code, from SPEC §15.1 alone.
    let code = LinkCode::new([7u8; LINK_SECRET_LEN], addrs()[..1].to_vec(), Some(relay()))
        .expect("a code");
    assert_eq!(code.encode(), KAT_RELAY_CODE);
    let read = LinkCode::parse(KAT_RELAY_CODE).expect("reads");
    assert_eq!(read, code);
    assert_eq!(read.relay(), Some(&relay()));
    let queues = code.queues();
    assert_eq!(hex(&queues.to_old.0.0), KAT_TO_OLD_READ);
    assert_eq!(hex(&queues.to_old.1.0), KAT_TO_OLD_WRITE);
    assert_eq!(hex(&queues.to_new.0.0), KAT_TO_NEW_READ);
    assert_eq!(hex(&queues.to_new.1.0), KAT_TO_NEW_WRITE);
    // A relay alone is a place to reach the device.
    let only = LinkCode::new([7u8; LINK_SECRET_LEN], vec![], Some(relay())).expect("a code");
    assert_eq!(LinkCode::parse(&only.encode()).expect("reads"), only);
}

const KAT_RELAY_CODE: &str = "kkd1efVi9Ki6uMvTPGkx7quMNgoxa1aikm5d6erviuDqyyL25es64ttykNaupcdMB2n6Nkp6ZAJaD5bUYZgRWtMtY1cu3vMxbswuCHf9NqzKmCuT";
const KAT_TO_OLD_READ: &str = "4d74632f7329cb5b05509ec34a25b0de75804879e0290c0f76ffe1fa6cacd747";
const KAT_TO_OLD_WRITE: &str = "9ada32d9c4eb6ad10eede0e99fdce005e8ecfd1ad95ba64e58f7d017f5c54b1e";
const KAT_TO_NEW_READ: &str = "b27e1f92b91f2f89c05e61e2724e88a5bab9a5f43d2b41e8b10bdb15bfbaf0e6";
const KAT_TO_NEW_WRITE: &str = "db5b8561ff19963f01c6580fa6e4528079dfee8d1607f5a5acf0b051eb0f7dab";

#[test]
fn a_relay_in_a_code_is_one_short_address_ending_in_its_id() {
    let no_id: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().expect("a multiaddr");
    assert!(matches!(
        LinkCode::new([0; LINK_SECRET_LEN], vec![], Some(no_id)),
        Err(LinkError::Relay)
    ));
    let long: Multiaddr = format!(
        "/dns/{}.example/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        "a".repeat(80)
    )
    .parse()
    .expect("a multiaddr");
    assert!(matches!(
        LinkCode::new([0; LINK_SECRET_LEN], vec![], Some(long)),
        Err(LinkError::Relay)
    ));
    let one: SocketAddr = "10.0.0.1:1".parse().expect("an address");
    assert!(matches!(
        LinkCode::new(
            [0; LINK_SECRET_LEN],
            vec![one; MAX_LINK_ADDRS],
            Some(relay())
        ),
        Err(LinkError::Addresses(9))
    ));
    // The most a code holds still fits its bound.
    let v6: SocketAddr = "[2001:db8::1]:65535".parse().expect("an address");
    let biggest: Multiaddr = format!(
        "/dns/{}.example/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        "a".repeat(40)
    )
    .parse()
    .expect("a multiaddr");
    let most = LinkCode::new(
        [0xff; LINK_SECRET_LEN],
        vec![v6; MAX_LINK_ADDRS - 1],
        Some(biggest),
    )
    .expect("fits");
    let text = most.encode();
    assert!(text.len() <= MAX_LINK_CODE_LEN, "{} characters", text.len());
    assert_eq!(LinkCode::parse(&text).expect("reads"), most);
    // Two relays, or a relay that is no multiaddr, are refused.
    let mut contents = vec![LINK_VERSION];
    contents.extend_from_slice(&[0; LINK_SECRET_LEN]);
    let r = relay().to_vec();
    contents.push(2);
    for _ in 0..2 {
        contents.push(b'r');
        contents.push(r.len() as u8);
        contents.extend_from_slice(&r);
    }
    assert!(matches!(
        LinkCode::parse(&raw_code(&contents)),
        Err(LinkError::Relay)
    ));
    let mut junk = vec![LINK_VERSION];
    junk.extend_from_slice(&[0; LINK_SECRET_LEN]);
    junk.extend_from_slice(&[1, b'r', 3, 0xff, 0xff, 0xff]);
    assert!(matches!(
        LinkCode::parse(&raw_code(&junk)),
        Err(LinkError::Relay)
    ));
}

#[test]
fn a_relayed_message_reads_back_none_ends_its_stream_and_oversized_ones_are_refused() {
    let sent = Relayed {
        stream: [3; LINK_STREAM_LEN],
        seq: 7,
        bytes: vec![1, 2, 3],
    };
    let payload = sent.encode();
    assert_eq!(payload.len(), LINK_STREAM_LEN + 4 + 3);
    assert_eq!(Relayed::decode(&payload).expect("reads"), sent);
    assert!(!Relayed::decode(&payload).expect("reads").is_end());
    let end = Relayed::decode(&payload[..LINK_STREAM_LEN + 4]).expect("the end");
    assert!(end.is_end() && end.seq == 7);
    assert!(Relayed::decode(&payload[..10]).is_err(), "cut short");
    let mut big = payload[..LINK_STREAM_LEN + 4].to_vec();
    big.extend(std::iter::repeat_n(0u8, MAX_LINK_RELAYED + 1));
    assert!(
        Relayed::decode(&big).is_err(),
        "longer than an envelope carries"
    );
    big.pop();
    assert_eq!(
        Relayed::decode(&big).expect("the most").bytes.len(),
        MAX_LINK_RELAYED
    );
}

#[test]
fn the_secret_stays_out_of_logs() {
    let shown = format!("{:?}", code());
    assert!(shown.contains("127.0.0.1:7000"), "{shown}");
    assert!(
        !shown.contains("secret") && !shown.contains("[7, 7"),
        "{shown}"
    );
}

/// Both ends of one handshake under `code`: the joining device's channel, the linking
/// device's.
fn pair(code: &LinkCode, seed: u64) -> (Channel, Channel) {
    let (joining, first) = code.join(&mut crate::test_rng(seed));
    let (answered, answer) = code.answer(&first).expect("same code");
    let (joiner, hello) = joining.finish(&answer).expect("same code");
    let linker = answered.hello(&hello).expect("its hello");
    (joiner, linker)
}

#[test]
fn both_ends_of_one_code_talk_in_both_directions() {
    let code = LinkCode::generate(&mut crate::test_rng(1), addrs(), None).expect("a code");
    let (mut joiner, mut linker) = pair(&code, 2);
    let big = vec![0x5a; MAX_LINK_CHUNK];
    let sealed = linker.seal(&big).expect("seals");
    assert_eq!(sealed.len(), MAX_LINK_MESSAGE);
    assert_eq!(joiner.open(&sealed).expect("opens"), big);
    let back = joiner.seal(b"ready").expect("seals");
    assert_eq!(linker.open(&back).expect("opens"), b"ready");
    // Both ends of one handshake show one safety number; another handshake (someone
    // else who holds the code) shows another.
    let shown = linker.safety_number();
    assert_eq!(joiner.safety_number(), shown);
    assert_eq!(shown.len(), 9, "{shown}");
    let (other, linked) = pair(&code, 3);
    assert_eq!(other.safety_number(), linked.safety_number());
    assert_ne!(other.safety_number(), shown);
    assert!(matches!(
        linker.seal(&vec![0; MAX_LINK_CHUNK + 1]),
        Err(LinkError::TooBig(_))
    ));
}

#[test]
fn another_code_never_completes_the_handshake() {
    let right = code();
    let wrong = LinkCode::new([8u8; LINK_SECRET_LEN], addrs(), None).expect("a code");
    let rng = &mut crate::test_rng(4);
    // A joiner with the wrong code: the linker refuses its first message.
    let (_, first) = wrong.join(rng);
    assert!(matches!(right.answer(&first), Err(LinkError::Handshake)));
    // A linker with the wrong code: the joiner refuses its answer.
    let (joining, _) = right.join(rng);
    let (_, answer) = wrong
        .answer(&wrong.join(rng).1)
        .expect("its own code answers");
    assert!(matches!(joining.finish(&answer), Err(LinkError::Handshake)));
    // Junk and an empty message, likewise.
    assert!(matches!(right.answer(&[]), Err(LinkError::Handshake)));
    assert!(matches!(
        right.answer(&[0u8; LINK_FIRST_LEN]),
        Err(LinkError::Handshake)
    ));
    assert!(matches!(
        right.answer(&vec![0u8; MAX_LINK_MESSAGE + 1]),
        Err(LinkError::Handshake)
    ));
    // Each message has its one length; one longer is refused before it is read.
    let (joining, first) = right.join(rng);
    assert_eq!(first.len(), LINK_FIRST_LEN);
    let mut longer = first.clone();
    longer.push(0);
    assert!(matches!(right.answer(&longer), Err(LinkError::Handshake)));
    let (answered, answer) = right.answer(&first).expect("answers");
    assert_eq!(answer.len(), LINK_ANSWER_LEN);
    let (_, hello) = joining.finish(&answer).expect("finishes");
    assert_eq!(hello.len(), LINK_HELLO_LEN);
    answered.hello(&hello).expect("its hello opens");
}

#[test]
fn a_first_message_sent_again_gets_no_channel() {
    let code = code();
    let rng = &mut crate::test_rng(5);
    let (joining, first) = code.join(rng);
    let (answered, answer) = code.answer(&first).expect("same code");
    let (_, hello) = joining.finish(&answer).expect("same code");
    answered.hello(&hello).expect("the real one");
    // Someone who recorded the first message (and its hello) sends both again: the
    // answer is new, so the old hello does not open under it, and no hello can be made
    // without the joining device's ephemeral key.
    let (replayed, _) = code.answer(&first).expect("message 1 alone proves nothing");
    assert!(matches!(replayed.hello(&hello), Err(LinkError::Handshake)));
    let (replayed, _) = code.answer(&first).expect("again");
    assert!(matches!(
        replayed.hello(&[0u8; LINK_HELLO_LEN]),
        Err(LinkError::Handshake)
    ));
}

#[test]
fn a_hello_that_does_not_reveal_the_committed_nonce_is_refused() {
    // Whoever answers the joining device learns its nonce only from the hello, after
    // its answer is sent; a hello revealing another nonce than the first message
    // committed to (to steer the number) is refused.
    let code = code();
    let (mut joining, first) = code.join(&mut crate::test_rng(6));
    let (answered, answer) = code.answer(&first).expect("same code");
    joining.nonce = [9u8; NONCE_LEN];
    let (_, hello) = joining.finish(&answer).expect("same code");
    assert!(matches!(answered.hello(&hello), Err(LinkError::Handshake)));
}

#[test]
fn an_altered_replayed_or_reordered_message_does_not_open() {
    let code = code();
    let (mut joiner, mut linker) = pair(&code, 7);
    let one = linker.seal(b"one").expect("seals");
    let two = linker.seal(b"two").expect("seals");
    let mut flipped = one.clone();
    flipped[0] ^= 1;
    assert!(matches!(joiner.open(&flipped), Err(LinkError::Tampered)));
    // Out of order: the second before the first.
    assert!(matches!(joiner.open(&two), Err(LinkError::Tampered)));
    // A failed open moves nothing on: the first still opens, once.
    assert_eq!(joiner.open(&one).expect("opens"), b"one");
    assert!(matches!(joiner.open(&one), Err(LinkError::Tampered)));
    assert_eq!(joiner.open(&two).expect("opens"), b"two");
}
