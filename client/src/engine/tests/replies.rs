//! Replies and reactions: each side shows what a reply answers from its own copy, a
//! reaction lands on the message it names (theirs or ours, as the sender says), the
//! later of two changes by the sender's numbers wins whatever order they arrive in, and
//! each is announced once as a change of an earlier message, never as a new one.

use super::*;
use crate::engine::Change;
use crate::store::Quote;

#[tokio::test]
async fn replies_and_reactions_reach_the_contact_each_side_showing_its_own_copy() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    let (question, _) = alice.send(&bob_c, "lunch?").await;
    bob.sync().await;
    // Bob answers Alice's message.
    let mut sending = bob
        .engine
        .send_reply(alice_c.peer, "김밥 🍙".into(), Some(question.id))
        .await
        .unwrap();
    assert!(matches!(
        sending.events.recv().await,
        Some(SendEvent::Durable)
    ));
    bob.engine.settle().await.unwrap();
    let shown = alice.sync().await;
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].change, None, "a reply is a new message");
    let answer = shown[0].message.clone();
    assert_eq!(answer.text, "김밥 🍙");
    assert_eq!(
        answer.reply_to,
        Some(Quote {
            id: question.id.0,
            ours: true
        }),
        "at Alice's, it answers her own message"
    );
    let at_bob = bob.messages(&alice);
    assert_eq!(
        at_bob.last().unwrap().reply_to,
        Some(Quote {
            id: question.id.0,
            ours: false
        }),
        "at Bob's, it answers hers"
    );

    // Alice reacts to Bob's answer; Bob to Alice's question.
    let answer_id = MessageId(answer.id);
    alice
        .engine
        .react(bob_c.peer, answer_id, "👍".into())
        .await
        .unwrap();
    bob.engine
        .react(alice_c.peer, question.id, "❤".into())
        .await
        .unwrap();
    alice.engine.settle().await.unwrap();
    bob.engine.settle().await.unwrap();
    let at_bob = bob.sync().await;
    assert_eq!(at_bob.len(), 1);
    assert_eq!(at_bob[0].change, Some(Change::Reacted));
    assert_eq!(at_bob[0].message.id, answer.id);
    let at_alice = alice.sync().await;
    assert_eq!(at_alice[0].change, Some(Change::Reacted));
    let find = |u: &User, with: &User, id: [u8; 16]| {
        u.messages(with).into_iter().find(|m| m.id == id).unwrap()
    };
    let r = find(&bob, &alice, answer.id).reactions;
    assert_eq!((r.ours.as_str(), r.theirs.as_str()), ("", "👍"));
    let r = find(&alice, &bob, answer.id).reactions;
    assert_eq!((r.ours.as_str(), r.theirs.as_str()), ("👍", ""));
    let r = find(&alice, &bob, question.id.0).reactions;
    assert_eq!((r.ours.as_str(), r.theirs.as_str()), ("", "❤"));

    // Taken back.
    alice
        .engine
        .react(bob_c.peer, answer_id, String::new())
        .await
        .unwrap();
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    assert_eq!(find(&bob, &alice, answer.id).reactions.theirs, "");
    // All of it took its place in each side's numbers: nothing missing.
    for (u, c) in [(&alice, &bob_c), (&bob, &alice_c)] {
        assert_eq!(
            u.engine
                .store()
                .conversation(&c.peer)
                .unwrap()
                .gaps
                .missing(),
            0
        );
    }
    // Nothing to answer or react to that is not there.
    let nowhere = MessageId([0x5a; 16]);
    assert!(
        alice
            .engine
            .send_reply(bob_c.peer, "?".into(), Some(nowhere))
            .await
            .is_err()
    );
    assert!(
        alice
            .engine
            .react(bob_c.peer, nowhere, "👍".into())
            .await
            .is_err()
    );
}

/// Seals `body` as `from`'s next sequenced record for `to`, advancing `from`'s own
/// numbers as a send would, without sending it.
async fn next_record(from: &User, to: &Contact, body: Body) -> Content {
    let peer = to.peer;
    from.engine
        .change(move |state, now| {
            let mut conv = state.store.conversation(&peer)?;
            let content = Content {
                id: MessageId(rand::random()),
                seq: conv.next_seq.max(1),
                prev: conv.last_hash,
                sent_at_ms: now,
                body,
            };
            conv.next_seq = content.seq + 1;
            conv.last_hash = content.hash();
            let mut w = WriteSet::default();
            LocalStore::write_conversation(&mut w, &peer, &conv);
            state.store.apply(w)?;
            Ok(content)
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn of_two_edits_or_reactions_the_later_by_number_wins_whatever_order_they_arrive_in() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _alice_c) = pair(&net).await;
    let (note, _) = alice.send(&bob_c, "meet at 6").await;
    bob.sync().await;
    let edit = |text: &str| Body::Edit {
        target: note.id,
        text: text.into(),
    };
    let react = |emoji: &str| Body::Reaction {
        target: note.id,
        own: true,
        emoji: emoji.into(),
    };
    let first_edit = next_record(&alice, &bob_c, edit("meet at 7")).await;
    let second_edit = next_record(&alice, &bob_c, edit("meet at 8")).await;
    let first_reaction = next_record(&alice, &bob_c, react("👍")).await;
    let second_reaction = next_record(&alice, &bob_c, react("🎉")).await;
    // The later ones arrive first.
    for content in [&second_edit, &second_reaction] {
        alice.send_raw(&bob_c, content).await;
    }
    bob.sync().await;
    for content in [&first_edit, &first_reaction] {
        alice.send_raw(&bob_c, content).await;
    }
    bob.sync().await;
    let at_bob = bob.messages(&alice);
    assert_eq!(
        at_bob[0].text, "meet at 8",
        "the older edit, later, changes nothing"
    );
    assert_eq!(at_bob[0].reactions.theirs, "🎉");
    assert_eq!(
        bob.engine
            .store()
            .conversation(&alice.peer())
            .unwrap()
            .gaps
            .missing(),
        0,
        "every number arrived"
    );
}
