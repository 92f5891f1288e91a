//! Runs every committed fuzz corpus entry through its target under plain `cargo test`,
//! so inputs that once crashed (and the seeds) are checked on every run.

use std::fs;
use std::path::Path;

use kkachi_protocol::fuzzing::TARGETS;

#[test]
fn every_corpus_entry_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in TARGETS {
        let dir = root.join(name);
        let entries: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus for {name} missing at {}: {e}", dir.display()))
            .map(|e| e.expect("readable entry").path())
            .collect();
        assert!(!entries.is_empty(), "corpus for {name} is empty");
        for path in entries {
            let data = fs::read(&path).expect("readable corpus file");
            target(&data);
        }
    }
}

#[test]
fn seeds_exercise_the_success_paths() {
    // The seeds are valid inputs: each must decode, or the corpus no longer seeds
    // anything useful (for example after a format change).
    use kkachi_protocol::{Card, ClientToRelay, Content, Envelope, RelayToClient, session};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let read = |t: &str, f: &str| fs::read(root.join(t).join(f)).expect("seed present");
    assert!(Card::from_invite(std::str::from_utf8(&read("invite", "valid")).unwrap()).is_ok());
    assert!(Envelope::decode(&read("envelope", "valid")).is_ok());
    for i in 0..5 {
        assert!(ClientToRelay::decode(&read("wire_request", &format!("req-{i}"))).is_ok());
        assert!(RelayToClient::decode(&read("wire_response", &format!("resp-{i}"))).is_ok());
    }
    for i in 0..10 {
        assert!(
            Content::decode(&read("content", &format!("content-{i}"))).is_ok(),
            "content-{i}"
        );
    }
    // A device set (kind 12), the account's one set seeded for `device_set`.
    let devices = Content::decode(&read("content", "content-15")).expect("content-15");
    assert!(matches!(
        &devices.body,
        kkachi_protocol::Body::Devices(set) if set[..] == read("device_set", "set")[1..]
    ));
    {
        use kkachi_protocol::file::{ChunkId, FileRef, Manifest};
        let file = read("file", "file-ref");
        assert!(FileRef::decode(&file[1..]).is_ok());
        let sealed = &read("file", "manifest")[1..];
        let key = kkachi_protocol::fuzzing::FUZZ_FILE_KEY;
        assert_eq!(
            Manifest::open(&key, &ChunkId::of(sealed), sealed)
                .unwrap()
                .chunks
                .len(),
            2
        );
    }
    {
        use kkachi_protocol::fuzzing::{FUZZ_EPOCH_KEY, FUZZ_GROUP};
        use kkachi_protocol::group::large::{EpochKey, KeyRecord, Post, open_item};
        let record = KeyRecord::decode(&read("group_large", "key")[1..]).unwrap();
        let me = kkachi_protocol::fuzzing::fuzz_recipient();
        assert_eq!(
            record.unwrap(&me).map(|k| k.id(&FUZZ_GROUP)),
            Some(record.epoch())
        );
        let post = Post::decode(&read("group_large", "post")[1..]).unwrap();
        let key = EpochKey::from_bytes(FUZZ_EPOCH_KEY);
        assert_eq!(
            open_item(&FUZZ_GROUP, &key, &read("group_large", "item")[1..], |_| {
                true
            })
            .unwrap(),
            post
        );
    }
    {
        use kkachi_protocol::device::DeviceSet;
        let account = *kkachi_protocol::fuzzing::fuzz_sender().public().ed25519();
        let set = DeviceSet::decode(&account, &read("device_set", "set")[1..]).unwrap();
        assert_eq!(set.devices().count(), 3);
        let pair = read("device_set", "pair");
        let len = usize::from(u16::from_be_bytes([pair[1], pair[2]]));
        let mut a = DeviceSet::decode(&account, &pair[3..3 + len]).unwrap();
        let b = DeviceSet::decode(&account, &pair[3 + len..]).unwrap();
        let merged = a.merge(&b).unwrap();
        assert_eq!((merged.added.len(), merged.removed.len()), (0, 1));
        assert_eq!(a.devices().count(), 2);
    }
    let me = kkachi_protocol::fuzzing::fuzz_recipient();
    assert!(matches!(
        session::open(&me, &read("session_packet", "init")),
        Ok(session::Incoming::Init(_))
    ));
    assert!(kkachi_protocol::Session::decode(&read("session_state", "established")).is_ok());
    assert!(kkachi_protocol::lan::Beacon::decode(&read("lan_beacon", "valid")).is_ok());
    assert_eq!(
        kkachi_protocol::bundle::decode(&read("bundle", "valid"))
            .expect("the bundle seed decodes")
            .len(),
        2
    );
}
