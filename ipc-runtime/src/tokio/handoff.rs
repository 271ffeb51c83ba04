//! One value handed from a thread of the library's own to the task that awaits it, such that
//! the thread holds nothing of the task's runtime once the task can have the value.
//!
//! A tokio oneshot's sender holds the receiver's waker — and through it the task's runtime,
//! with the runtime's own fds (its epoll instance and eventfd) — until the sender is dropped,
//! which is just after it woke the task: the task may have gone on and its runtime been
//! dropped meanwhile, and the runtime's fds then stayed open until that thread got the CPU
//! again. Here the thread wakes the task, and drops the waker, under the lock the task takes
//! to look for the value; a task that has the value, or has been dropped, has taken its
//! waker out.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

/// What the two halves share.
struct Slot<T> {
    value: Option<T>,
    /// The giving half is gone: no value will come if none has.
    given: bool,
    /// The task's waker, while it waits.
    waker: Option<Waker>,
}

/// A channel for one value, from a thread ([`Give`]) to a task ([`Receive`]).
pub(crate) fn channel<T>() -> (Give<T>, Receive<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        given: false,
        waker: None,
    }));
    (Give(slot.clone()), Receive(slot))
}

/// The thread's half: gives the value, or, dropped without one, says none will come.
pub(crate) struct Give<T>(Arc<Mutex<Slot<T>>>);

impl<T> Give<T> {
    /// Hands `value` to the task (dropped with the channel if the task is gone).
    pub(crate) fn give(self, value: T) {
        self.0.lock().value = Some(value);
        // The drop wakes the task.
    }
}

impl<T> Drop for Give<T> {
    fn drop(&mut self) {
        let mut slot = self.0.lock();
        slot.given = true;
        // Woken, and dropped, under the lock: the task cannot see the value before this
        // thread has let go of its waker.
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
    }
}

/// The task's half: resolves to the value, or `None` if the thread dropped its half without
/// one (it panicked).
pub(crate) struct Receive<T>(Arc<Mutex<Slot<T>>>);

impl<T> Future for Receive<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut slot = self.0.lock();
        if slot.value.is_some() || slot.given {
            slot.waker = None;
            return Poll::Ready(slot.value.take());
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> Drop for Receive<T> {
    fn drop(&mut self) {
        // Taken out, so that the thread does not hold it (and the runtime) after this.
        let waker = self.0.lock().waker.take();
        drop(waker);
    }
}
