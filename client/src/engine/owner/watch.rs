//! Who follows a send: the events its [`Sending`](super::super::Sending) stream gets.

use tokio::sync::mpsc;

use super::super::{Progress, SendEvent};

/// Who waits on a send's progress. What happens before its write is durable is kept
/// until then: "durable" always comes first.
pub(super) struct Watcher {
    events: mpsc::Sender<SendEvent>,
    durable: bool,
    early: Vec<SendEvent>,
    /// Attempts under way for this message.
    in_flight: u32,
    /// The contact's receipt came while attempts were under way: whether one of them
    /// handed it over directly is known when they finish.
    receipted: bool,
    /// `Delivered` was told.
    delivered: bool,
    /// Its outbox entry is gone: no more attempts.
    gone: bool,
}

impl Watcher {
    pub(super) fn new(events: mpsc::Sender<SendEvent>) -> Self {
        Watcher {
            events,
            durable: false,
            early: Vec::new(),
            in_flight: 0,
            receipted: false,
            delivered: false,
            gone: false,
        }
    }

    fn tell_delivered(&mut self, direct: bool) {
        if !self.delivered {
            self.delivered = true;
            self.tell(SendEvent::Delivered { direct });
        }
    }

    /// An attempt for it starts.
    pub(super) fn on_attempt(&mut self) {
        self.in_flight += 1;
    }

    /// An attempt's answer, recorded: whether it handed the message over directly, the
    /// progress it made, and whether the outbox entry is gone.
    pub(super) fn on_answer(&mut self, handed_over: bool, progress: Option<Progress>, gone: bool) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.gone |= gone;
        if handed_over {
            self.tell_delivered(true);
        } else if let Some(p) = progress {
            self.tell(SendEvent::Progress(p));
        }
        if self.receipted && self.in_flight == 0 {
            self.tell_delivered(false);
        }
    }

    /// Gone from the outbox, not by an answer here: the contact's receipt (or the
    /// contact was removed). An attempt under way may yet tell that it went directly.
    pub(super) fn on_receipt(&mut self) {
        self.gone = true;
        match self.in_flight {
            0 => self.tell_delivered(false),
            _ => self.receipted = true,
        }
    }

    /// Nobody listens any more.
    pub(super) fn abandoned(&self) -> bool {
        self.events.is_closed()
    }

    /// Nothing more will be told.
    pub(super) fn finished(&self) -> bool {
        self.durable && self.in_flight == 0 && (self.delivered || self.gone)
    }

    fn tell(&mut self, event: SendEvent) {
        if self.durable {
            // A receiver that lags misses some progress; the last word is in the store.
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
        let mut w = Watcher::new(tx);
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
        let mut w = Watcher::new(tx);
        w.durable(Ok(()));
        w.on_attempt();
        w.on_receipt();
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
        let mut w = Watcher::new(tx);
        w.durable(Ok(()));
        w.on_attempt();
        w.on_answer(false, Some(progress(2)), false);
        w.on_receipt();
        w.on_receipt();
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
        let mut w = Watcher::new(tx);
        w.durable(Ok(()));
        w.on_attempt();
        w.on_receipt();
        w.on_answer(false, None, true);
        assert_eq!(drain(&mut rx), ["Durable", "Delivered { direct: false }"]);
        assert!(w.finished());
    }

    #[test]
    fn a_failed_flush_is_told() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Watcher::new(tx);
        w.durable(Err(std::sync::Arc::new(StoreError::Db("disk full".into()))));
        assert_eq!(drain(&mut rx), ["NotDurable(Db(\"disk full\"))"]);
    }
}
