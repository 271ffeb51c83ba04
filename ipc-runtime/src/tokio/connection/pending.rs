//! The calls of this end waiting for their replies, by cookie: where the reader puts a reply
//! and wakes its call. A slot in a table under the state lock, rather than a channel per call,
//! so that a call costs no allocation, and so that a call dropped as its reply arrives finds
//! the reply in its slot or finds no slot taken: there is no moment in between.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::task::{Context, Poll, Waker};

use crate::connection::CookieHasher;
use crate::error::{Error, Result};
use crate::frame::Frame;

/// The calls waiting for replies, and the replies their calls have not taken yet.
#[derive(Default)]
pub(super) struct Pending {
    /// One slot outside the map, taken first: most connections have one call out at a time,
    /// and this one costs a comparison rather than a hash table's insert and lookups.
    first: Option<(u64, Slot)>,
    others: HashMap<u64, Slot, BuildHasherDefault<CookieHasher>>,
    /// How many slots are `Waiting`.
    waiting: usize,
    /// How many of them are calls a handler of this connection made: the reader must read on
    /// past the backlog's bounds while any is (see [`backlog`](crate::connection::backlog)).
    from_handlers: usize,
}

enum Slot {
    /// No reply yet: the waker of the call's task once the call has waited, and whether a
    /// handler of this connection made the call.
    Waiting(Option<Waker>, bool),
    /// The reply, or why the connection ended, for the call to take.
    Answered(Result<Frame>),
}

impl Pending {
    /// A slot for the call `cookie`, made by a handler of this connection if `from_handler`,
    /// before its request goes out: the reply may come back before the send returns.
    pub(super) fn insert(&mut self, cookie: u64, from_handler: bool) {
        let slot = Slot::Waiting(None, from_handler);
        match self.first {
            None => self.first = Some((cookie, slot)),
            Some(_) => {
                self.others.insert(cookie, slot);
            }
        }
        self.waiting += 1;
        self.from_handlers += usize::from(from_handler);
    }

    /// Whether no call waits for a reply still to come.
    pub(super) fn nobody_waits(&self) -> bool {
        self.waiting == 0
    }

    /// Whether no call a handler of this connection made waits for a reply still to come.
    pub(super) fn no_handler_waits(&self) -> bool {
        self.from_handlers == 0
    }

    /// A slot that waited no longer does.
    fn waits_no_more(&mut self, from_handler: bool) {
        self.waiting -= 1;
        self.from_handlers -= usize::from(from_handler);
    }

    /// Puts the reply to `cookie` in its slot, giving back the waker to wake (once the state
    /// lock is released); or gives the reply back if no call waits for it (it was dropped).
    pub(super) fn answer(
        &mut self,
        cookie: u64,
        reply: Result<Frame>,
    ) -> std::result::Result<Option<Waker>, Result<Frame>> {
        match self.slot(cookie) {
            Some(slot @ Slot::Waiting(..)) => {
                let Slot::Waiting(waker, from_handler) =
                    std::mem::replace(slot, Slot::Answered(reply))
                else {
                    unreachable!("matched as waiting")
                };
                self.waits_no_more(from_handler);
                Ok(waker)
            }
            // A second reply to one call: the first stays, this one goes back.
            Some(Slot::Answered(_)) | None => Err(reply),
        }
    }

    /// Answers every waiting call with `why`, as the connection ends; the wakers to wake.
    pub(super) fn fail_all(&mut self, why: &Error) -> Vec<Waker> {
        let mut wakers = Vec::new();
        let first = self.first.iter_mut().map(|(_, slot)| slot);
        for slot in first.chain(self.others.values_mut()) {
            if let Slot::Waiting(waker, _) = slot {
                wakers.extend(waker.take());
                *slot = Slot::Answered(Err(why.duplicate()));
            }
        }
        self.waiting = 0;
        self.from_handlers = 0;
        wakers
    }

    /// The reply to `cookie` if it is in, its slot gone with it; otherwise the call waits,
    /// to be woken through `cx` when it comes.
    pub(super) fn poll_take(&mut self, cookie: u64, cx: &mut Context<'_>) -> Poll<Result<Frame>> {
        match self.slot(cookie) {
            Some(Slot::Waiting(waker, _)) => {
                match waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            Some(Slot::Answered(_)) => {}
            // Every slot is answered before it goes, and only its call takes it.
            None => return Poll::Ready(Err(Error::Disconnected)),
        }
        match self.remove(cookie) {
            Some(Slot::Answered(reply)) => Poll::Ready(reply),
            _ => unreachable!("found answered above"),
        }
    }

    /// Removes the slot of a call dropped before it took its reply; the reply if it had come
    /// (to be finished unread, and dropped with its fds, once the state lock is released),
    /// else whether the call still waited for it (the peer may be working on it).
    pub(super) fn cancel(&mut self, cookie: u64) -> std::result::Result<Frame, bool> {
        match self.remove(cookie) {
            Some(Slot::Waiting(_, from_handler)) => {
                self.waits_no_more(from_handler);
                Err(true)
            }
            Some(Slot::Answered(Ok(reply))) => Ok(reply),
            Some(Slot::Answered(Err(_))) | None => Err(false),
        }
    }

    fn slot(&mut self, cookie: u64) -> Option<&mut Slot> {
        match &mut self.first {
            Some((first, slot)) if *first == cookie => Some(slot),
            _ => self.others.get_mut(&cookie),
        }
    }

    fn remove(&mut self, cookie: u64) -> Option<Slot> {
        match self.first {
            Some((first, _)) if first == cookie => self.first.take().map(|(_, slot)| slot),
            _ => self.others.remove(&cookie),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Pending {
        fn is_empty(&self) -> bool {
            self.first.is_none() && self.others.is_empty()
        }
    }

    /// A waker that counts its wakes in the `Count` it comes with.
    fn counting_waker() -> (Arc<Count>, Waker) {
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        (woken.clone(), Waker::from(woken))
    }

    fn frame(byte: u8) -> Frame {
        Frame {
            payload: vec![byte],
            fds: Vec::new(),
        }
    }

    #[test]
    fn a_reply_wakes_its_waiting_call_which_takes_it_and_frees_the_slot() {
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut pending = Pending::default();
        pending.insert(7, false);
        assert!(!pending.nobody_waits());
        assert!(pending.poll_take(7, &mut cx).is_pending());
        let to_wake = pending.answer(7, Ok(frame(1))).ok().unwrap().unwrap();
        assert!(pending.nobody_waits(), "an answered call waits no more");
        to_wake.wake();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        match pending.poll_take(7, &mut cx) {
            Poll::Ready(Ok(reply)) => assert_eq!(reply.payload, [1]),
            other => panic!("{other:?}"),
        }
        assert!(pending.is_empty());
    }

    #[test]
    fn a_reply_before_the_call_waits_is_taken_at_once_and_wakes_nobody() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut pending = Pending::default();
        pending.insert(1, false);
        assert!(pending.answer(1, Ok(frame(2))).ok().unwrap().is_none());
        assert!(matches!(pending.poll_take(1, &mut cx), Poll::Ready(Ok(_))));
        assert!(pending.is_empty() && pending.nobody_waits());
    }

    #[test]
    fn a_reply_nobody_waits_for_comes_back_to_be_dropped() {
        let mut pending = Pending::default();
        pending.insert(1, false);
        assert!(pending.cancel(1).unwrap_err(), "it waited");
        assert!(pending.nobody_waits());
        let back = pending.answer(1, Ok(frame(3))).unwrap_err().unwrap();
        assert_eq!(back.payload, [3]);
        // A second reply to an answered call comes back too, leaving the first in place.
        pending.insert(2, false);
        pending.answer(2, Ok(frame(4))).unwrap();
        assert_eq!(
            pending
                .answer(2, Ok(frame(5)))
                .unwrap_err()
                .unwrap()
                .payload,
            [5]
        );
        assert_eq!(pending.cancel(2).unwrap().payload, [4]);
        assert!(!pending.cancel(2).unwrap_err(), "no slot left");
        assert!(pending.is_empty());
    }

    #[test]
    fn the_end_of_the_connection_answers_every_waiting_call_and_keeps_replies_in() {
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut pending = Pending::default();
        for cookie in 1..=3 {
            pending.insert(cookie, false);
        }
        assert!(pending.poll_take(1, &mut cx).is_pending());
        assert!(pending.poll_take(2, &mut cx).is_pending());
        pending.answer(2, Ok(frame(9))).unwrap().unwrap().wake();
        let wakers = pending.fail_all(&Error::Disconnected);
        assert_eq!(wakers.len(), 1, "only call 1 waited with a waker");
        assert!(pending.nobody_waits());
        for waker in wakers {
            waker.wake();
        }
        assert_eq!(woken.0.load(Ordering::SeqCst), 2);
        assert!(matches!(
            pending.poll_take(1, &mut cx),
            Poll::Ready(Err(Error::Disconnected))
        ));
        assert!(matches!(pending.poll_take(2, &mut cx), Poll::Ready(Ok(_))));
        assert!(matches!(
            pending.poll_take(3, &mut cx),
            Poll::Ready(Err(Error::Disconnected))
        ));
        assert!(pending.is_empty());
    }

    #[test]
    fn calls_beside_the_first_are_answered_in_any_order_and_the_first_slot_is_reused() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut pending = Pending::default();
        for cookie in 1..=3 {
            pending.insert(cookie, false);
            assert!(pending.poll_take(cookie, &mut cx).is_pending());
        }
        assert_eq!(pending.first.as_ref().map(|(cookie, _)| *cookie), Some(1));
        assert_eq!(pending.others.len(), 2);
        pending.answer(3, Ok(frame(3))).unwrap();
        pending.answer(1, Ok(frame(1))).unwrap();
        assert!(!pending.nobody_waits(), "call 2 still waits");
        for cookie in [3, 1] {
            match pending.poll_take(cookie, &mut cx) {
                Poll::Ready(Ok(reply)) => assert_eq!(reply.payload, [cookie as u8]),
                other => panic!("{other:?}"),
            }
        }
        // The first slot is free again while call 2 waits in the map.
        pending.insert(4, false);
        assert_eq!(pending.first.as_ref().map(|(cookie, _)| *cookie), Some(4));
        assert!(pending.cancel(2).unwrap_err());
        assert!(
            pending.answer(2, Ok(frame(2))).is_err(),
            "call 2 was dropped"
        );
        pending.answer(4, Ok(frame(4))).unwrap();
        assert!(pending.nobody_waits());
        assert!(matches!(pending.poll_take(4, &mut cx), Poll::Ready(Ok(_))));
        assert!(pending.is_empty());
    }
}
