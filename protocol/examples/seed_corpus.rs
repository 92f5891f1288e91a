//! Writes the seed corpus for the fuzz targets: valid examples of every format, made
//! with the public API, so fuzzing starts from realistic inputs.
//!
//! Run from the repository root: `cargo run -p kkachi-protocol --example seed_corpus`.
//! The output lands in `protocol/fuzz/corpus/<target>/` and is committed; the corpus
//! test runs every file under plain `cargo test`.

use std::fs;
use std::path::Path;

use kkachi_protocol::content::{Body, Content, MessageId, ReceiptStatus};
use kkachi_protocol::fuzzing::{fuzz_recipient, fuzz_sender};
use kkachi_protocol::session::{self, Incoming};
use kkachi_protocol::wire::{Addressed, PROTOCOL_VERSION, PutOutcome, RelayInfo, StoredEnvelope};
use kkachi_protocol::{
    Card, ClientToRelay, Envelope, EnvelopeId, ErrorCode, Multiaddr, QueueKind, RelayToClient,
    Session,
};

const NOW: u64 = 1_750_000_000;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("create corpus dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    // Devices: two copies of one account's set, edited apart (one linked a phone, the
    // other took out a tablet), alone and as a pair to merge.
    {
        use kkachi_protocol::device::DeviceSet;
        let me = fuzz_sender();
        let mut laptop = DeviceSet::new(&me, "laptop", NOW).expect("a valid set");
        laptop.add(&me, [3; 32], "tablet", NOW + 1).expect("room");
        let mut desk = laptop.clone();
        laptop.add(&me, [9; 32], "phone", NOW + 2).expect("room");
        desk.remove(&me, &[3; 32], NOW + 3).expect("listed");
        let (a, b) = (laptop.encode(), desk.encode());
        write("device_set", "set", &[&[0][..], &a].concat());
        let len = u16::try_from(a.len()).expect("small").to_be_bytes();
        write("device_set", "pair", &[&[1][..], &len, &a, &b].concat());
        // The same set as a contact receives it (content kind 12).
        let content = Content {
            id: MessageId(std::array::from_fn(|i| i as u8)),
            seq: 0,
            prev: [0; 32],
            sent_at_ms: NOW * 1000,
            body: Body::Devices(a),
        };
        write("content", "content-15", &content.encode());
    }
    // Groups: a creation, an add, a demotion and a removal, as one member shares them.
    {
        use kkachi_protocol::group::{Hlc, Mode, Op, Role, SignedOp, encode_ops};
        let (founder, member) = (fuzz_sender(), fuzz_recipient());
        let at = |ms| Hlc { ms, count: 0 };
        let create = SignedOp::create(&founder, "Alice", [1; 16], "Family", Mode::Chat, at(1));
        let id = create.group();
        let member_key = *member.public().ed25519();
        let ops = [
            create,
            SignedOp::sign(
                &founder,
                id,
                2,
                at(2),
                Op::Add {
                    member: member.public(),
                    name: "Bob".into(),
                    role: Role::Admin,
                },
            ),
            SignedOp::sign(
                &founder,
                id,
                3,
                at(3),
                Op::SetRole {
                    member: member_key,
                    role: Role::Member,
                    cut: 0,
                },
            ),
            SignedOp::sign(
                &founder,
                id,
                4,
                at(4),
                Op::Remove {
                    member: member_key,
                    cut: 0,
                },
            ),
            SignedOp::sign(&founder, id, 5, at(5), Op::SetTimer { secs: 86_400 }),
        ];
        write("group", "log", &encode_ops(&ops));
        write("group", "create", &encode_ops(&ops[..1]));
    }
    // The large tier: a key record (0 ‖ record), a post (1 ‖ post) and an item under
    // the corpus's epoch key (2 ‖ item).
    {
        use kkachi_protocol::content::MessageId;
        use kkachi_protocol::fuzzing::{FUZZ_EPOCH_KEY, FUZZ_GROUP};
        use kkachi_protocol::group::Hlc;
        use kkachi_protocol::group::large::{EpochKey, KeyRecord, Post, PostBody};
        let (admin, member) = (fuzz_sender(), fuzz_recipient());
        let key = EpochKey::from_bytes(FUZZ_EPOCH_KEY);
        let at = Hlc { ms: 7, count: 0 };
        let members = [admin.x25519_public(), member.x25519_public()];
        let record = KeyRecord::make(&admin, FUZZ_GROUP, 1, at, &key, &members)
            .expect("two wraps")
            .remove(0);
        write("group_large", "key", &[&[0][..], record.encode()].concat());
        let post = Post::sign(
            &admin,
            FUZZ_GROUP,
            key.id(&FUZZ_GROUP),
            1,
            MessageId([0; 16]),
            at,
            PostBody::Message {
                seconds: 0,
                text: "evacuate to the school gym".into(),
            },
        )
        .expect("a valid post");
        write("group_large", "post", &[&[1][..], post.encode()].concat());
        let item = post.seal(&key, &mut rand_core::OsRng);
        write("group_large", "item", &[&[2][..], &item[..]].concat());
    }
    // Files: a file reference (0 ‖ encoding) and a manifest sealed under the
    // corpus key (1 ‖ sealed).
    {
        use kkachi_protocol::file::{ChunkId, FileRef, Manifest};
        let key = kkachi_protocol::fuzzing::FUZZ_FILE_KEY;
        let (id, sealed) = Manifest {
            size: 300_000,
            chunks: vec![ChunkId([1; 32]), ChunkId([2; 32])],
        }
        .seal(&key)
        .expect("a manifest seals");
        let file = FileRef {
            key,
            manifest: id,
            size: 300_000,
            name: "지도.png".into(),
            mime: "image/png".into(),
            thumbnail: vec![0x89, b'P', b'N', b'G'],
        };
        write("file", "file-ref", &[&[0u8][..], &file.encode()].concat());
        write("file", "manifest", &[&[1u8][..], &sealed].concat());
    }
    let alice = fuzz_sender();
    let bob = fuzz_recipient();
    let relay: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{}", bob.peer_id())
        .parse()
        .expect("valid multiaddr");
    let card = Card::new(&alice, "Alice 앨리스", vec![relay.clone(), relay], 7).expect("card");
    write("invite", "valid", card.to_invite().as_bytes());
    write(
        "invite",
        "no-relays",
        Card::new(&bob, "Bob", vec![], 1)
            .expect("card")
            .to_invite()
            .as_bytes(),
    );

    let envelope = Envelope {
        expires_at: NOW + 3600,
        payload: b"sealed bytes".to_vec(),
    };
    write("envelope", "valid", &envelope.encode());
    let inbox = bob.inbox_key(&bob.peer_id());

    let requests = [
        ClientToRelay::Put {
            items: vec![
                Addressed {
                    write: alice.write_key_for(&bob.public(), &bob.peer_id()),
                    envelope: envelope.clone(),
                },
                Addressed {
                    write: bob.request_write_key(&bob.peer_id(), 0),
                    envelope: envelope.clone(),
                },
            ],
        },
        ClientToRelay::Fetch {
            key: inbox.clone(),
            after: 3,
            limit: 100,
        },
        ClientToRelay::Subscribe {
            key: inbox.clone(),
            after: 0,
            wait_ms: 25_000,
        },
        ClientToRelay::Delete {
            key: inbox.clone(),
            ids: vec![envelope.id(), EnvelopeId([9; 32])],
        },
        ClientToRelay::Info,
        ClientToRelay::Grant {
            key: inbox.clone(),
            kind: QueueKind::Inbox,
            token: Vec::new(),
            write_ids: vec![bob.grant_for(&alice.public(), &bob.peer_id()).id()],
        },
        ClientToRelay::Revoke {
            key: inbox.clone(),
            write_ids: vec![bob.grant_for(&alice.public(), &bob.peer_id()).id()],
        },
        ClientToRelay::PutChunk {
            write: bob.grant_for(&alice.public(), &bob.peer_id()),
            expires_at: 1_800_000_000,
            id: kkachi_protocol::file::ChunkId::of(b"chunk"),
            data: b"chunk".to_vec(),
        },
        ClientToRelay::GetChunk {
            key: inbox.clone(),
            id: kkachi_protocol::file::ChunkId::of(b"chunk"),
        },
        ClientToRelay::HasChunks {
            write: bob.grant_for(&alice.public(), &bob.peer_id()),
            ids: vec![kkachi_protocol::file::ChunkId([3; 32])],
        },
        ClientToRelay::DeleteChunks {
            key: inbox.clone(),
            ids: vec![kkachi_protocol::file::ChunkId([3; 32])],
        },
    ];
    for (i, r) in requests.iter().enumerate() {
        write("wire_request", &format!("req-{i}"), &r.encode());
    }
    let responses = [
        RelayToClient::Stored {
            outcomes: vec![
                PutOutcome::Stored,
                PutOutcome::Duplicate,
                PutOutcome::Rejected {
                    code: ErrorCode::QuotaExceeded,
                    message: "mailbox full".into(),
                },
            ],
            epoch: 0x1234_5678,
        },
        RelayToClient::Batch {
            items: vec![StoredEnvelope {
                cursor: 4,
                envelope: envelope.clone(),
            }],
            next: 4,
            more: false,
        },
        RelayToClient::Deleted { count: 2 },
        RelayToClient::Chunk {
            data: b"chunk".to_vec(),
        },
        RelayToClient::ChunksHeld {
            held: vec![true, false, true],
        },
        RelayToClient::Info(RelayInfo {
            protocol_version: PROTOCOL_VERSION,
            software: "kkachi-relay/0.1.0".into(),
            name: "seoul-1".into(),
            operator: "ops@example.org".into(),
            failure_domain: "provider-a/seoul".into(),
            max_payload: 65536,
            max_ttl_secs: 2_592_000,
            capability_max_envelopes: 1_000,
            capability_max_bytes: 32 << 20,
            puts_per_sec: 50,
            open_policy: 0,
            grants_per_queue: 4_096,
            request_max_envelopes: 256,
            request_max_ttl_secs: 7 * 24 * 3600,
            now_secs: NOW,
            store_epoch: 0x1234_5678,
        }),
        RelayToClient::Granted { grants: 12 },
        RelayToClient::error(ErrorCode::RateLimited, "slow down"),
    ];
    for (i, r) in responses.iter().enumerate() {
        write("wire_response", &format!("resp-{i}"), &r.encode());
    }

    let text = Content {
        id: MessageId([1; 16]),
        seq: 1,
        prev: [0; 32],
        sent_at_ms: NOW * 1000,
        body: Body::Text("안녕하세요, hello".into()),
    };
    // A group founded by the sender, for the group records below.
    let group_create = kkachi_protocol::group::SignedOp::create(
        &fuzz_sender(),
        "Alice",
        [2; 16],
        "Family",
        kkachi_protocol::group::Mode::Chat,
        kkachi_protocol::group::Hlc { ms: 1, count: 0 },
    );
    let contents = [
        text.clone(),
        Content {
            seq: 0,
            body: Body::Receipt {
                status: ReceiptStatus::Delivered,
                ids: vec![MessageId([1; 16])],
            },
            ..text.clone()
        },
        Content {
            seq: 2,
            prev: text.hash(),
            body: Body::CardUpdate(Box::new(card.clone())),
            ..text.clone()
        },
        Content {
            body: Body::Unknown {
                kind: 900,
                data: vec![1, 2, 3],
            },
            ..text.clone()
        },
        Content {
            seq: 0,
            body: Body::Timer { secs: 86_400 },
            ..text.clone()
        },
        Content {
            seq: 3,
            body: Body::TimedText {
                secs: 3600,
                text: "곧 사라져요".into(),
            },
            ..text.clone()
        },
        Content {
            seq: 4,
            body: Body::Edit {
                target: MessageId([1; 16]),
                text: "안녕, hello".into(),
            },
            ..text.clone()
        },
        Content {
            seq: 5,
            body: Body::Delete {
                target: MessageId([1; 16]),
            },
            ..text.clone()
        },
        Content {
            seq: 6,
            body: Body::Reply {
                target: MessageId([1; 16]),
                own: false,
                secs: 0,
                text: "네, 좋아요".into(),
            },
            ..text.clone()
        },
        Content {
            seq: 7,
            body: Body::Reaction {
                target: MessageId([1; 16]),
                own: true,
                emoji: "👍".into(),
            },
            ..text.clone()
        },
        Content {
            seq: 8,
            body: Body::File {
                secs: 0,
                file: Box::new(kkachi_protocol::file::FileRef {
                    key: kkachi_protocol::file::FileKey([7; 32]),
                    manifest: kkachi_protocol::file::ChunkId([9; 32]),
                    size: 300_000,
                    name: "지도.png".into(),
                    mime: "image/png".into(),
                    thumbnail: vec![0x89, b'P', b'N', b'G'],
                }),
            },
            ..text.clone()
        },
        Content {
            seq: 9,
            body: Body::Group {
                group: group_create.group(),
                what: kkachi_protocol::content::GroupBody::Message {
                    hlc: kkachi_protocol::group::Hlc { ms: 5, count: 1 },
                    have: [4; 16],
                    secs: 0,
                    text: "저녁 7시".into(),
                },
            },
            ..text.clone()
        },
        Content {
            seq: 10,
            body: Body::Group {
                group: group_create.group(),
                what: kkachi_protocol::content::GroupBody::File {
                    hlc: kkachi_protocol::group::Hlc { ms: 6, count: 0 },
                    have: [4; 16],
                    secs: 3600,
                    file: Box::new(kkachi_protocol::file::FileRef {
                        key: kkachi_protocol::file::FileKey([8; 32]),
                        manifest: kkachi_protocol::file::ChunkId([10; 32]),
                        size: 1_200_000,
                        name: "대피소.jpg".into(),
                        mime: "image/jpeg".into(),
                        thumbnail: vec![0xff, 0xd8, 0xff],
                    }),
                },
            },
            ..text.clone()
        },
        Content {
            seq: 0,
            body: Body::Group {
                group: group_create.group(),
                what: kkachi_protocol::content::GroupBody::Ops {
                    all: true,
                    have: [5; 16],
                    ops: vec![group_create.clone()],
                },
            },
            ..text.clone()
        },
        Content {
            seq: 0,
            body: Body::Group {
                group: group_create.group(),
                what: kkachi_protocol::content::GroupBody::Cards {
                    cards: vec![card.clone()],
                },
            },
            ..text.clone()
        },
    ];
    for (i, c) in contents.iter().enumerate() {
        write("content", &format!("content-{i}"), &c.encode());
    }

    // Real packets from alice to bob: first messages, then transport after a reply.
    let mut rng = rand_core::OsRng;
    let mut a = Session::with_instance(bob.x25519_public(), [1; 8]);
    let mut b = Session::with_instance(alice.x25519_public(), [2; 8]);
    write("session_state", "fresh", &a.encode());
    let bob_card = Card::new(&bob, "Bob", vec![], 1).expect("card");
    let init = a
        .seal(&alice, &card, &text.encode(), NOW, &mut rng)
        .expect("seal");
    write("session_packet", "init", &init);
    let Ok(Incoming::Init(p)) = session::open(&bob, &init) else {
        panic!("init opens")
    };
    b.accept_init(&bob, p, NOW).expect("accept");
    let reply = b
        .seal(&bob, &bob_card, b"reply", NOW, &mut rng)
        .expect("seal");
    let Ok(Incoming::Init(p)) = session::open(&alice, &reply) else {
        panic!("reply opens")
    };
    a.accept_init(&alice, p, NOW).expect("accept");
    let transport = a
        .seal(&alice, &card, &text.encode(), NOW, &mut rng)
        .expect("seal");
    write("session_packet", "transport", &transport);
    write("session_state", "established", &a.encode());
    write("session_state", "answered", &b.encode());

    let keys = [alice.lan_key_for(&bob.public()).expect("contributory")];
    let from = std::net::IpAddr::from([10, 0, 0, 1]);
    let beacons =
        kkachi_protocol::lan::beacons(&alice.peer_id(), &keys, 1, (from, (4001, 4002)), &mut rng);
    write("lan_beacon", "valid", &beacons[0].encode());
    println!("seed corpus written to protocol/fuzz/corpus/");
}
