//! Files between two engines, over in-memory relays that keep chunks: where chunks go,
//! a file its sender broke, and what is fetched without being asked.

use std::path::Path;

use kkachi_protocol::file::{FileKey, FileRef};

use super::*;
use crate::files::{self, FilesError};
use crate::store::IncomingState;

fn random_file(path: &Path, size: usize, seed: u8) {
    let mut x = u64::from(seed) | 1;
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, bytes).unwrap();
}

/// Sends the file at `path` from `alice` to `to` (sealed, uploaded, its message queued);
/// its reference.
async fn sent_file(alice: &User, to: &Contact, path: &Path) -> FileRef {
    let claim = files::prepare(&alice.engine, files::To::Contact(to.peer), path)
        .await
        .unwrap();
    let id = claim.id;
    files::upload(&alice.engine, claim).await.unwrap();
    alice
        .engine
        .store()
        .outgoing_file(&id)
        .unwrap()
        .unwrap()
        .file()
        .unwrap()
}

/// The file message `bob` received last, after taking in what waits.
async fn received_file(bob: &User) -> FileRef {
    bob.sync().await;
    bob.engine
        .store()
        .recent_messages(&bob.contacts()[0], 50)
        .unwrap()
        .iter()
        .rev()
        .find_map(|m| m.file.as_ref()?.file())
        .expect("a file message")
}

impl User {
    fn contacts(&self) -> Vec<PeerId> {
        self.engine
            .store()
            .contacts()
            .unwrap()
            .iter()
            .map(|c| c.peer)
            .collect()
    }
}

#[tokio::test]
async fn a_file_goes_on_two_relays_then_its_message_and_arrives_whole() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.bin");
    random_file(&path, 3 << 20, 5);
    let claim = files::prepare(&alice.engine, files::To::Contact(bob_c.peer), &path)
        .await
        .unwrap();
    let report = files::upload(&alice.engine, claim).await.unwrap();
    assert!(report.message_sent);
    assert_eq!((report.copies, report.relays), (2, 3));
    // Larger than 1 MiB: each chunk on two relays, not three (12 chunks and the
    // manifest, 26 copies in all).
    let copies: usize = net.inner.lock().chunks.values().map(HashMap::len).sum();
    assert_eq!(copies, 2 * (12 + 1));
    let file = received_file(&bob).await;
    let fetched = files::fetch(&bob.engine, file.id()).await.unwrap();
    assert!(fetched.complete);
    assert_eq!((fetched.fetched, fetched.bad), (12, 0));
    let saved = files::export(bob.engine.store(), &file.id(), &dir.path().join("out")).unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), std::fs::read(&path).unwrap());
    // Here and on disk: the relays are told to let the chunks go.
    files::release(&bob.engine, file.id()).await.unwrap();
    assert_eq!(
        net.inner
            .lock()
            .chunks
            .values()
            .map(HashMap::len)
            .sum::<usize>(),
        0
    );
    // A second fetch fetches nothing.
    let again = files::fetch(&bob.engine, file.id()).await.unwrap();
    assert_eq!(again.fetched, 0);
}

#[tokio::test]
async fn a_file_its_sender_broke_is_marked_failed_and_not_fetched_again() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.jpg");
    random_file(&path, 100_000, 7);
    let good = sent_file(&alice, &bob_c, &path).await;
    // The same chunks, named with another key: every relay serves the bytes named,
    // and they do not open.
    let broken = FileRef {
        key: FileKey([9; 32]),
        ..good.clone()
    };
    alice.queue_file(&bob_c, broken.clone()).await;
    alice.engine.deliver_now().await.unwrap();
    assert_eq!(received_file(&bob).await, broken);
    let e = files::fetch(&bob.engine, broken.id()).await.unwrap_err();
    assert!(
        matches!(&e, FilesError::Refused(why) if why.contains("sender")),
        "{e}"
    );
    let record = bob
        .engine
        .store()
        .incoming_file(&broken.id())
        .unwrap()
        .unwrap();
    assert!(
        matches!(record.state, IncomingState::Failed(_)),
        "{record:?}"
    );
    // Asked again, it is refused at once: nothing more is fetched.
    let served = net.inner.lock().chunks_served;
    assert!(files::fetch(&bob.engine, broken.id()).await.is_err());
    assert_eq!(net.inner.lock().chunks_served, served);
    // The honest reference to the same chunks is another file, and it opens.
    assert!(files::fetch(&bob.engine, good.id()).await.unwrap().complete);
    let saved = files::export(bob.engine.store(), &good.id(), dir.path()).unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), std::fs::read(&path).unwrap());
}

#[tokio::test]
async fn pictures_are_fetched_on_their_own_only_within_their_budget() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    // Twelve pictures of 8 MiB and a document, as a contact may announce them (no
    // chunks behind them: what is decided here is only whether to fetch).
    for i in 0..13u8 {
        let file = FileRef {
            key: FileKey([i; 32]),
            manifest: kkachi_protocol::file::ChunkId([i; 32]),
            size: 8 << 20,
            name: format!("IMG_{i}.jpg"),
            mime: if i < 12 {
                "image/jpeg"
            } else {
                "application/pdf"
            }
            .into(),
            thumbnail: Vec::new(),
        };
        alice.queue_file(&bob_c, file).await;
    }
    alice.engine.deliver_now().await.unwrap();
    bob.sync().await;
    // Round after round, as a running daemon does it (each fetch stops short: no relay
    // has the chunks, and it waits to be tried again).
    for _ in 0..6 {
        for task in files::resume(&bob.engine, true).unwrap() {
            task.await.unwrap();
        }
    }
    let (_, incoming) = bob.engine.store().file_transfers().unwrap();
    assert_eq!(incoming.len(), 13);
    let auto = incoming.iter().filter(|(_, r)| r.auto).count();
    assert_eq!(
        auto,
        (files::AUTO_FETCH_PER_CONTACT / (8 << 20)) as usize,
        "64 MiB of pictures per contact"
    );
    let document = incoming
        .iter()
        .find(|(_, r)| r.file().unwrap().mime == "application/pdf")
        .unwrap();
    assert_eq!(document.1.state, IncomingState::Offered);
    assert!(!document.1.auto);
}

#[tokio::test]
async fn a_file_sent_in_two_messages_stays_while_either_is_here() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("map.png");
    random_file(&path, 50_000, 9);
    let file = sent_file(&alice, &bob_c, &path).await;
    // The same reference again, in a second message.
    alice.queue_file(&bob_c, file.clone()).await;
    alice.engine.deliver_now().await.unwrap();
    bob.sync().await;
    assert!(files::fetch(&bob.engine, file.id()).await.unwrap().complete);
    let carrying: Vec<[u8; 16]> = bob
        .engine
        .store()
        .recent_messages(&alice_c.peer, 50)
        .unwrap()
        .iter()
        .filter(|m| m.file.is_some())
        .map(|m| m.id)
        .collect();
    assert_eq!(carrying.len(), 2);
    // The first deleted here: the file stays, named by the second.
    bob.engine
        .delete_for_me(alice_c.peer, MessageId(carrying[0]))
        .await
        .unwrap();
    let record = bob.engine.store().incoming_file(&file.id()).unwrap();
    assert_eq!(record.map(|r| r.message), Some(carrying[1]));
    let saved = files::export(bob.engine.store(), &file.id(), dir.path()).unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), std::fs::read(&path).unwrap());
    // The second too: it goes.
    bob.engine
        .delete_for_me(alice_c.peer, MessageId(carrying[1]))
        .await
        .unwrap();
    assert!(
        bob.engine
            .store()
            .incoming_file(&file.id())
            .unwrap()
            .is_none()
    );
    assert!(files::export(bob.engine.store(), &file.id(), dir.path()).is_err());
}

#[tokio::test]
async fn a_file_cancelled_is_not_sent_and_a_fetch_cancelled_starts_again() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("draft.pdf");
    random_file(&path, 40_000, 11);
    // Sealed, then cancelled before it went: never sent, its sealed copy gone.
    let claim = files::prepare(&alice.engine, files::To::Contact(bob_c.peer), &path)
        .await
        .unwrap();
    let id = claim.id;
    assert_eq!(
        files::cancel(alice.engine.store(), false, &id).unwrap(),
        files::Cancelled::Upload
    );
    assert!(files::upload(&alice.engine, claim).await.is_err());
    assert!(
        std::fs::read_dir(files::out_dir(alice.engine.store().home()))
            .unwrap()
            .flatten()
            .all(|e| e.file_name().to_string_lossy().starts_with('.'))
    );
    bob.sync().await;
    assert!(
        bob.engine.store().file_transfers().unwrap().1.is_empty(),
        "a cancelled file reached them"
    );
    // Sent, not asked for: nothing to stop.
    let claim = files::prepare(&alice.engine, files::To::Contact(bob_c.peer), &path)
        .await
        .unwrap();
    files::upload(&alice.engine, claim).await.unwrap();
    let file = received_file(&bob).await;
    let err = files::cancel(bob.engine.store(), true, &file.id()).unwrap_err();
    assert!(err.to_string().contains("not being fetched"), "{err}");
    // A fetch that failed is set back, and fetched again, whole.
    let mut record = bob
        .engine
        .store()
        .incoming_file(&file.id())
        .unwrap()
        .unwrap();
    record.state = IncomingState::Failed("a relay was down".into());
    let mut w = WriteSet::default();
    LocalStore::write_incoming_file(&mut w, &file.id(), &record);
    bob.engine.store().apply(w).unwrap();
    assert_eq!(
        files::cancel(bob.engine.store(), true, &file.id()).unwrap(),
        files::Cancelled::Fetch
    );
    let again = files::fetch(&bob.engine, file.id()).await.unwrap();
    assert_eq!(again.fetched, 1);
    // Fetched (its relays may let it go once saved): not undone, it stays here.
    let err = files::cancel(bob.engine.store(), true, &file.id()).unwrap_err();
    assert!(err.to_string().contains("fetched already"), "{err}");
    let saved = files::export(bob.engine.store(), &file.id(), dir.path()).unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), std::fs::read(&path).unwrap());
}

#[tokio::test]
async fn a_file_sent_while_a_relay_was_out_gets_its_second_copy_when_it_returns() {
    let net = FakeNet::default();
    let alice = User::started(&net, "alice", 2).await;
    let bob = User::started(&net, "bob", 2).await;
    let bob_c = alice.add_contact(&bob);
    bob.add_contact(&alice);
    alice.regrant().await;
    bob.regrant().await;
    // Bob's second relay lost everything (our grant too): it refuses Alice's puts.
    net.wipe_relay(&bob.relays[1]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("route.bin");
    random_file(&path, 3 << 20, 11);
    let claim = files::prepare(&alice.engine, files::To::Contact(bob_c.peer), &path)
        .await
        .unwrap();
    let id = claim.id;
    let report = files::upload(&alice.engine, claim).await.unwrap();
    // It went, with one copy of each chunk, and is not done with.
    assert!(report.message_sent && report.degraded);
    assert_eq!(report.copies, 1);
    let record = alice.engine.store().outgoing_file(&id).unwrap().unwrap();
    assert!(record.message_sent && !record.finished, "{record:?}");
    assert!(received_file(&bob).await.id() == id);
    // The relay takes puts again: the next run puts the second copies, and is done.
    bob.regrant().await;
    let claim = alice.engine.transfers().claim(false, id).unwrap();
    let report = files::upload(&alice.engine, claim).await.unwrap();
    assert_eq!(report.copies, 2);
    assert!(
        alice
            .engine
            .store()
            .outgoing_file(&id)
            .unwrap()
            .unwrap()
            .finished
    );
    let copies: usize = net.inner.lock().chunks.values().map(HashMap::len).sum();
    assert_eq!(copies, 2 * (12 + 1));
    // Nothing was sent twice.
    bob.sync().await;
    let files_shown = bob
        .engine
        .store()
        .recent_messages(&bob.contacts()[0], 50)
        .unwrap()
        .iter()
        .filter(|m| m.file.is_some())
        .count();
    assert_eq!(files_shown, 1);
}

/// Taking messages in and the sweep take turns on a file's records: a message offering
/// a file, taken in while the sweep is between reading the file's records and writing
/// them, is not written over (else the sweep, which found the file offered by nothing,
/// would remove it from under the message just shown).
#[tokio::test]
async fn a_file_offered_while_the_sweep_runs_stays() {
    let net = FakeNet::default();
    let bob = User::started(&net, "bob", 1).await;
    let store = bob.engine.store().clone();
    let file = FileRef {
        key: FileKey([1; 32]),
        manifest: kkachi_protocol::file::ChunkId([2; 32]),
        size: 10,
        name: "map.png".into(),
        mime: "image/png".into(),
        thumbnail: Vec::new(),
    };
    let id = file.id();
    // Offered by a message that is not here: the next sweep removes it.
    let mut w = crate::store::WriteSet::default();
    store
        .offer_incoming_file(&mut w, &file, b"gone".to_vec(), [1; 16], 1, None)
        .unwrap();
    store.apply(w).unwrap();
    let (read_tx, read_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = parking_lot::Mutex::new(go_rx);
    let read_tx = parking_lot::Mutex::new(read_tx);
    *files::SWEEP_PAUSE.lock() = Some((
        store.home().to_path_buf(),
        std::sync::Arc::new(move || {
            let _ = read_tx.lock().send(());
            // Taking turns, the message cannot come in now: the sweep goes on alone.
            let _ = go_rx
                .lock()
                .recv_timeout(std::time::Duration::from_millis(300));
        }),
    ));
    let sweeping = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || files::sweep(&store))
    };
    tokio::task::spawn_blocking(move || read_rx.recv())
        .await
        .unwrap()
        .expect("the sweep read the file's records");
    // A message offering the same file comes in, as the engine takes messages in.
    bob.engine
        .change(move |state, now| {
            state.with_sessions(|this, _| {
                let mut w = crate::store::WriteSet::default();
                this.store.offer_incoming_file(
                    &mut w,
                    &file,
                    b"carol".to_vec(),
                    [2; 16],
                    now,
                    None,
                )?;
                Ok(this.store.apply(w)?)
            })
        })
        .await
        .unwrap();
    let _ = go_tx.send(());
    sweeping.await.unwrap().unwrap();
    *files::SWEEP_PAUSE.lock() = None;
    let record = store
        .incoming_file(&id)
        .unwrap()
        .expect("the file of the message taken in is still offered");
    assert_eq!(record.message, [2; 16], "named by the message still here");
    assert!(
        store
            .file_offers(&id)
            .unwrap()
            .iter()
            .any(|o| o.message == [2; 16])
    );
}
