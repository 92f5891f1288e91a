//! Who follows a send: the events its [`Sending`](super::super::Sending) stream gets.

use kkachi_protocol::{MessageId, PeerId};
use tokio::sync::mpsc;

use super::super::{Progress, SendEvent};

/// Who waits on a send's progress. What happens before its write is durable is kept
/// until then: "durable" always comes first, and it ends with `Delivered` or
/// `Withdrawn`, told once.
pub(super) struct Watcher {
    events: mpsc::Sender<SendEvent>,
    /// Whose message it is.
    pub(super) contact: PeerId,
    /// The message.
    pub(super) message: MessageId,
    durable: bool,
    early: Vec<SendEvent>,
    /// Attempts under way for this message.
    in_flight: u32,
    /// It left the outbox (delivered, or not) while attempts were under way: whether
    /// one of them handed it over directly is known when they finish.
    removed: Option<bool>,
    /// The last word (`Delivered` or `Withdrawn`) was told.
    ended: bool,
    /// Its outbox entry is gone: no more attempts.
    gone: bool,
}

impl Watcher {
    pub(super) fn new(
        events: mpsc::Sender<SendEvent>,
        contact: PeerId,
        message: MessageId,
    ) -> Self {
        Watcher {
            events,
            contact,
            message,
            durable: false,
            early: Vec::new(),
            in_flight: 0,
            removed: None,
            ended: false,
            gone: false,
        }
    }

    fn end(&mut self, event: SendEvent) {
        if !self.ended {
            self.ended = true;
            self.tell(event);
        }
    }

    fn end_removed(&mut self, delivered: bool) {
        self.end(match delivered {
            true => SendEvent::Delivered { direct: false },
            false => SendEvent::Withdrawn,
        });
    }

    /// An attempt for it starts.
    pub(super) fn on_attempt(&mut self) {
        self.in_flight += 1;
    }

    /// An attempt's answer, recorded: whether it handed the message over directly, the
    /// progress it made (if any), and whether the outbox entry is gone.
    pub(super) fn on_answer(&mut self, handed_over: bool, progress: Option<Progress>, gone: bool) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.gone |= gone;
        if handed_over {
            self.end(SendEvent::Delivered { direct: true });
        } else if let Some(p) = progress {
            self.tell(SendEvent::Progress(p));
        }
        if let Some(delivered) = self.removed
            && self.in_flight == 0
        {
            self.end_removed(delivered);
        }
    }

    /// A relay refused it (an answer of its own, recorded by `on_answer` too).
    pub(super) fn on_refused(&mut self, relay: &str, reason: &str) {
        self.tell(SendEvent::Refused {
            relay: relay.to_owned(),
            reason: reason.to_owned(),
        });
    }

    /// Gone from the outbox, not by an answer here: the contact's receipt
    /// (`delivered`), or the contact was removed or blocked. An attempt under way may
    /// yet tell that it went directly.
    pub(super) fn on_removed(&mut self, delivered: bool) {
        self.gone = true;
        match self.in_flight {
            0 => self.end_removed(delivered),
            _ => self.removed = Some(delivered),
        }
    }

    /// Nobody listens any more.
    pub(super) fn abandoned(&self) -> bool {
        self.events.is_closed()
    }

    /// Nothing more will be told.
    pub(super) fn finished(&self) -> bool {
        self.durable && self.in_flight == 0 && (self.ended || self.gone)
    }

    fn tell(&mut self, event: SendEvent) {
        if self.durable {
            // Progress is told only when it changes, a few times per message, so the
            // channel has room; a receiver that lags behind that misses some.
            let _ = self.events.try_send(event);
        } else {
            self.early.push(event);
        }
    }

    pub(super) fn durable(&mut self, flushed: super::Flushed) {
        let first = match flushed {
            Ok(()) => SendEvent::Durable,
            Err(why) => SendEvent::NotDurable(why),
        };
        self.durable = true;
        self.tell(first);
        for event in std::mem::take(&mut self.early) {
            self.tell(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    fn drain(rx: &mut mpsc::Receiver<SendEvent>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| format!("{e:?}"))
            .collect()
    }

    fn progress(acked: u8) -> Progress {
        Progress {
            acked,
            total: 2,
            direct: false,
        }
    }

    #[test]
    fn durable_comes_first_and_what_came_before_follows_in_order() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Watcher::new(tx, PeerId::random(), MessageId([1; 16]));
        w.on_attempt();
        w.on_answer(false, Some(progress(1)), false);
        assert!(drain(&mut rx).is_empty(), "nothing before durable");
        w.durable(Ok(()));
        assert_eq!(
            drain(&mut rx),
            [
                "Durable",
                &format!("{:?}", SendEvent::Progress(progress(1)))
            ]
        );
        assert!(!w.finished(), "not delivered and still in the outbox");
    }

    #[test]
    fn a_receipt_that_overtakes_a_direct_handover_still_reports_it_direct() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Watcher::new(tx, PeerId::random(), MessageId([1; 16]));
        w.durable(Ok(()));
        w.on_attempt();
        w.on_removed(true);
        assert_eq!(
            drain(&mut rx),
            ["Durable"],
            "waits for the attempt under way"
        );
        assert!(!w.finished());
        w.on_answer(true, None, true);
        assert_eq!(drain(&mut rx), ["Delivered { direct: true }"]);
        assert!(w.finished());
    }

    #[test]
    fn a_receipt_with_nothing_under_way_is_delivered_once() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Watcher::new(tx, PeerId::random(), MessageId([1; 16]));
        w.durable(Ok(()));
        w.on_attempt();
        w.on_answer(false, Some(progress(2)), false);
        w.on_removed(true);
        w.on_removed(true);
        let events = drain(&mut rx);
        assert_eq!(events.last().unwrap(), "Delivered { direct: false }");
        assert_eq!(
            events.iter().filter(|e| e.starts_with("Delivered")).count(),
            1
        );
        assert!(w.finished());
    }

    #[test]
    fn a_relayed_attempt_under_way_when_the_receipt_comes_reports_it_relayed() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Watcher::new(tx, PeerId::random(), MessageId([1; 16]));
        w.durable(Ok(()));
        w.on_attempt();
        w.on_removed(true);
        w.on_answer(false, None, true);
        assert_eq!(drain(&mut rx), ["Durable", "Delivered { direct: false }"]);
        assert!(w.finished());
    }

    #[test]
    fn a_message_withdrawn_from_the_outbox_says_so_once() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Watcher::new(tx, PeerId::random(), MessageId([1; 16]));
        w.durable(Ok(()));
        w.on_attempt();
        w.on_removed(false);
        assert_eq!(
            drain(&mut rx),
            ["Durable"],
            "waits for the attempt under way"
        );
        w.on_answer(false, None, true);
        w.on_removed(false);
        assert_eq!(drain(&mut rx), ["Withdrawn"]);
        assert!(w.finished());
    }

    #[test]
    fn a_failed_flush_is_told() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Watcher::new(tx, PeerId::random(), MessageId([1; 16]));
        w.durable(Err(std::sync::Arc::new(StoreError::Db("disk full".into()))));
        assert_eq!(drain(&mut rx), ["NotDurable(Db(\"disk full\"))"]);
    }
}
