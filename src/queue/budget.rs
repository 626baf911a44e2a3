//! The in-flight byte budget (`worker.max_inflight_bytes`): the consume loop takes a
//! delivery only while the bodies of the messages being processed add up to less than the
//! budget, so the working set stays bounded whatever the documents' sizes, on top of the
//! message count bound (`worker.concurrency`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes of message bodies being processed, against a limit. Cloning shares the count.
#[derive(Debug, Clone)]
pub(crate) struct ByteBudget {
    limit: usize,
    used: Arc<AtomicUsize>,
}

impl ByteBudget {
    /// A budget of `limit` bytes, none in use.
    pub(crate) fn new(limit: usize) -> Self {
        ByteBudget {
            limit,
            used: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether another delivery may be taken: the bodies in flight add up to less than the
    /// limit. So in-flight bytes stay below the limit plus one body, and a body larger than
    /// the limit is still taken, when nothing else is in flight.
    pub(crate) fn has_room(&self) -> bool {
        self.in_flight() < self.limit
    }

    /// Bytes counted as in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Counts `bytes` as in flight until the returned guard is dropped (when the message's
    /// task ends, however it ends).
    pub(crate) fn admit(&self, bytes: usize) -> Admitted {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Admitted {
            used: Arc::clone(&self.used),
            bytes,
        }
    }
}

/// One message's bytes in a [`ByteBudget`]; dropping it gives them back.
#[derive(Debug)]
pub(crate) struct Admitted {
    used: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_while_below_the_limit_and_gives_back_on_drop() {
        let budget = ByteBudget::new(5_000);
        assert!(budget.has_room());
        let a = budget.admit(2_000);
        let b = budget.admit(2_000);
        assert!(budget.has_room(), "4,000 of 5,000 in flight");
        let c = budget.admit(2_000);
        assert_eq!(budget.in_flight(), 6_000);
        assert!(!budget.has_room(), "6,000 of 5,000 in flight");
        drop(b);
        assert_eq!(budget.in_flight(), 4_000);
        assert!(budget.has_room());
        drop((a, c));
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn a_body_over_the_limit_is_taken_alone() {
        let budget = ByteBudget::new(100);
        let big = budget.admit(1_000);
        assert!(
            !budget.has_room(),
            "nothing else while the big body is in flight"
        );
        drop(big);
        assert!(budget.has_room());
    }

    #[test]
    fn clones_share_the_count() {
        let budget = ByteBudget::new(10);
        let clone = budget.clone();
        let held = clone.admit(10);
        assert!(!budget.has_room());
        drop(held);
        assert!(budget.has_room());
    }
}
