//! Continuous batching for the embedding thread.
//!
//! Every request's tokenised texts wait in one FIFO [`Queue`]; each forward pass takes texts
//! from its front up to a token budget, whichever requests they belong to. So:
//!
//! - passes are full whenever enough is queued: a request's texts may be split across two
//!   passes, and several small requests share one pass;
//! - a request is answered as soon as its last text is embedded, not when a whole group of
//!   requests is, so the worker can store that document and take the next one while the
//!   model runs on;
//! - the model never waits for a pass to fill: when less than a budget is queued, the pass
//!   takes what there is;
//! - a request of the live lane is queued ahead of every request of the bulk lane
//!   ([`crate::lane`]), and a pass never mixes the lanes: a live pass holds live texts only
//!   (so it is as short as the edit), and a bulk pass takes at most half the budget
//!   ([`BULK_PASS_DIVISOR`]). A fresh edit therefore waits at most for half a full pass
//!   already running, then for a pass of its own texts — not for a full pass of a backfill's
//!   chunks packed around it (measured by `benches/noisy_neighbour.rs`: that packing made
//!   an edit wait up to two full passes).
//!
//! This module only schedules; running the model is the caller's.

use std::collections::VecDeque;
use std::ops::Range;

use crate::lane::Lane;

/// A bulk pass takes at most `budget / BULK_PASS_DIVISOR` tokens, so that a live request
/// arriving during one waits at most that long. Half-size passes cost little throughput:
/// the forward pass's time is nearly linear in tokens once a pass holds a few texts.
pub(super) const BULK_PASS_DIVISOR: usize = 2;

/// The token ids of one text, as the model reads them (special tokens added, truncated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TokenIds {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Token type (segment) ids, as many as `ids`.
    pub type_ids: Vec<u32>,
}

/// A request being served: its texts, the vectors of those embedded so far (in order), and
/// the caller's handle `R` to answer it with.
#[derive(Debug)]
pub(super) struct Pending<R> {
    /// The request's texts, tokenised.
    pub texts: Vec<TokenIds>,
    /// Vectors of `texts[..vectors.len()]`.
    pub vectors: Vec<Vec<f32>>,
    /// How to answer the caller.
    pub reply: R,
    /// The lane of the message the request serves.
    pub lane: Lane,
}

impl<R> Pending<R> {
    /// A request of the live lane none of whose texts is embedded yet.
    pub fn new(texts: Vec<TokenIds>, reply: R) -> Self {
        Pending {
            texts,
            vectors: Vec::new(),
            reply,
            lane: Lane::Live,
        }
    }

    /// This request, serving a message of `lane`.
    pub fn in_lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }

    /// Whether every text has its vector.
    pub fn is_complete(&self) -> bool {
        self.vectors.len() >= self.texts.len()
    }
}

/// Which texts one forward pass embeds: for each request it draws from (index in the
/// queue, front first), a range of that request's texts.
pub(super) type Pass = Vec<(usize, Range<usize>)>;

/// The requests waiting for vectors, oldest first.
#[derive(Debug)]
pub(super) struct Queue<R> {
    pending: VecDeque<Pending<R>>,
    /// Most tokens one pass takes (a single longer text still gets a pass of its own).
    budget: usize,
}

impl<R> Queue<R> {
    /// An empty queue whose passes hold at most `budget` tokens.
    pub fn new(budget: usize) -> Self {
        Queue {
            pending: VecDeque::new(),
            budget: budget.max(1),
        }
    }

    /// Whether no request is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Queues a request: a bulk one at the back, a live one behind the other live ones but
    /// ahead of every bulk one (also one whose texts are partly embedded: it carries on
    /// after the live ones).
    pub fn push(&mut self, request: Pending<R>) {
        let first_bulk = match request.lane {
            Lane::Bulk => None,
            Lane::Live => self.pending.iter().position(|p| p.lane == Lane::Bulk),
        };
        match first_bulk {
            Some(index) => self.pending.insert(index, request),
            None => self.pending.push_back(request),
        }
    }

    /// Drops the requests for which `keep` is false (callers that went away).
    pub fn retain(&mut self, keep: impl FnMut(&Pending<R>) -> bool) {
        self.pending.retain(keep);
    }

    /// The request at `index`, as numbered in the last [`Queue::next_pass`].
    pub fn get(&self, index: usize) -> Option<&Pending<R>> {
        self.pending.get(index)
    }

    /// The request at `index`, as numbered in the last [`Queue::next_pass`], to record vectors.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut Pending<R>> {
        self.pending.get_mut(index)
    }

    /// The texts of the next forward pass: from the front request's first text without a
    /// vector onwards, in queue order, as many as fit in the budget (at least one), all of
    /// the lane of that first text: live requests (queued ahead) get passes of their own,
    /// and a bulk pass takes at most `budget / BULK_PASS_DIVISOR` tokens. Empty only if no
    /// request has a text left.
    pub fn next_pass(&self) -> Pass {
        let mut pass = Pass::new();
        let mut tokens = 0;
        let lane = self
            .pending
            .iter()
            .find(|request| !request.is_complete())
            .map_or(Lane::Live, |request| request.lane);
        let budget = match lane {
            Lane::Live => self.budget,
            Lane::Bulk => (self.budget / BULK_PASS_DIVISOR).max(1),
        };
        for (index, request) in self.pending.iter().enumerate() {
            if request.lane != lane {
                if request.is_complete() {
                    continue;
                }
                break;
            }
            let start = request.vectors.len();
            let mut end = start;
            for text in &request.texts[start..] {
                let len = text.ids.len();
                let first = pass.is_empty() && end == start;
                if !first && tokens + len > budget {
                    break;
                }
                tokens += len;
                end += 1;
            }
            if end > start {
                pass.push((index, start..end));
            }
            if end < request.texts.len() {
                break;
            }
        }
        pass
    }

    /// Removes and returns the requests at the front that have every vector, oldest first.
    /// Passes take texts in queue order, so these are all the complete requests except
    /// those without texts behind an incomplete one (answered once it completes).
    pub fn take_complete(&mut self) -> Vec<Pending<R>> {
        let mut done = Vec::new();
        while self.pending.front().is_some_and(Pending::is_complete) {
            done.extend(self.pending.pop_front());
        }
        done
    }

    /// Removes and returns the request at `index` (one that failed), leaving the others in
    /// order.
    pub fn remove(&mut self, index: usize) -> Option<Pending<R>> {
        self.pending.remove(index)
    }
}

#[cfg(test)]
mod tests {
    use super::{Lane, Pending, Queue, TokenIds};

    fn text(len: usize) -> TokenIds {
        TokenIds {
            ids: vec![1; len],
            type_ids: vec![0; len],
        }
    }

    fn request(lengths: &[usize], name: &'static str) -> Pending<&'static str> {
        Pending::new(lengths.iter().map(|&n| text(n)).collect(), name)
    }

    /// One pass as (queue index, lengths of the texts it took) per request.
    type Shown = Vec<(usize, Vec<usize>)>;

    /// Runs passes until the queue is empty, giving every text a vector holding its
    /// length; returns each pass and the order in which requests completed.
    fn drain(queue: &mut Queue<&'static str>) -> (Vec<Shown>, Vec<&'static str>) {
        let mut passes = Vec::new();
        let mut completed = Vec::new();
        loop {
            completed.extend(queue.take_complete().into_iter().map(|p| p.reply));
            if queue.is_empty() {
                return (passes, completed);
            }
            let pass = queue.next_pass();
            assert!(!pass.is_empty(), "a non-empty queue gives a non-empty pass");
            let mut shown = Vec::new();
            for (index, range) in pass {
                let request = queue.get_mut(index).expect("index from next_pass");
                assert_eq!(range.start, request.vectors.len(), "passes go in order");
                let lengths: Vec<usize> = request.texts[range.clone()]
                    .iter()
                    .map(|t| t.ids.len())
                    .collect();
                request
                    .vectors
                    .extend(lengths.iter().map(|&n| vec![n as f32]));
                shown.push((index, lengths));
            }
            passes.push(shown);
        }
    }

    #[test]
    fn passes_fill_the_budget_across_requests() {
        let mut queue = Queue::new(10);
        queue.push(request(&[4, 4], "a"));
        queue.push(request(&[1], "b"));
        queue.push(request(&[3, 5, 2], "c"));
        let (passes, completed) = drain(&mut queue);
        assert_eq!(
            passes,
            vec![
                // a and b whole, and the first text of c that fits: 4 + 4 + 1 = 9, + 3 > 10.
                vec![(0, vec![4, 4]), (1, vec![1])],
                // c continues in the next pass where it left off.
                vec![(0, vec![3, 5, 2])],
            ]
        );
        assert_eq!(completed, ["a", "b", "c"]);
    }

    #[test]
    fn a_request_is_split_across_passes_and_answered_after_its_last_text() {
        let mut queue = Queue::new(10);
        queue.push(request(&[6, 6, 6], "long"));
        queue.push(request(&[2], "short"));
        let (passes, completed) = drain(&mut queue);
        assert_eq!(
            passes,
            vec![
                vec![(0, vec![6])],
                vec![(0, vec![6])],
                vec![(0, vec![6]), (1, vec![2])],
            ]
        );
        assert_eq!(completed, ["long", "short"]);
    }

    #[test]
    fn a_text_over_the_budget_gets_a_pass_of_its_own() {
        let mut queue = Queue::new(10);
        queue.push(request(&[2], "a"));
        queue.push(request(&[25, 1], "b"));
        let (passes, _) = drain(&mut queue);
        assert_eq!(
            passes,
            vec![vec![(0, vec![2])], vec![(0, vec![25])], vec![(0, vec![1])]]
        );
    }

    #[test]
    fn requests_without_texts_complete_in_order() {
        let mut queue = Queue::new(10);
        queue.push(request(&[], "empty-first"));
        queue.push(request(&[3], "a"));
        queue.push(request(&[], "empty-behind"));
        let (passes, completed) = drain(&mut queue);
        // The empty request at the front is answered before any pass.
        assert_eq!(passes, vec![vec![(0, vec![3])]]);
        assert_eq!(completed, ["empty-first", "a", "empty-behind"]);
    }

    #[test]
    fn live_requests_go_ahead_of_bulk_ones() {
        let mut queue = Queue::new(10);
        queue.push(request(&[6, 6], "bulk-1").in_lane(Lane::Bulk));
        queue.push(request(&[4], "live-1"));
        queue.push(request(&[6], "bulk-2").in_lane(Lane::Bulk));
        // The first pass takes live-1, queued ahead of bulk-1, and nothing of the bulk lane.
        let pass = queue.next_pass();
        assert_eq!(pass, vec![(0, 0..1)]);
        for (index, range) in pass {
            let r = queue.get_mut(index).expect("queued");
            r.vectors.extend(range.map(|_| vec![0.0]));
        }
        let done: Vec<_> = queue.take_complete().into_iter().map(|p| p.reply).collect();
        assert_eq!(done, ["live-1"]);
        // A bulk pass takes at most half the budget (5 tokens here: one text of 6).
        let pass = queue.next_pass();
        assert_eq!(pass, vec![(0, 0..1)]);
        let r = queue.get_mut(0).expect("queued");
        r.vectors.push(vec![0.0]);
        // A live request arriving now overtakes bulk-1, although bulk-1 is half done, and
        // has a pass of its own.
        queue.push(request(&[3], "live-2"));
        let (passes, completed) = drain(&mut queue);
        assert_eq!(
            passes,
            vec![vec![(0, vec![3])], vec![(0, vec![6])], vec![(0, vec![6])]]
        );
        assert_eq!(completed, ["live-2", "bulk-1", "bulk-2"]);
    }

    #[test]
    fn removed_and_dropped_requests_leave_the_others_in_order() {
        let mut queue = Queue::new(4);
        queue.push(request(&[3], "a"));
        queue.push(request(&[3], "gone"));
        queue.push(request(&[3], "b"));
        queue.retain(|p| p.reply != "gone");
        let failed = queue.remove(0).map(|p| p.reply);
        assert_eq!(failed, Some("a"));
        let (passes, completed) = drain(&mut queue);
        assert_eq!(passes, vec![vec![(0, vec![3])]]);
        assert_eq!(completed, ["b"]);
    }
}
