//! Where a native training step's time goes, for `lrtune-dev bench --profile`: wall-clock
//! spans around the batch gather, each node's forward and backward pass, every matrix
//! product, the loss and the optimizer update, nested as they ran.
//!
//! Recording belongs to one thread: [`start`] gives the calling thread a recorder and
//! [`finish`] takes back what it recorded. A span opened on a thread without one records
//! nothing and costs a thread-local read, so the step keeps its spans in every build. The
//! native step hands the recorder to the pool thread it runs on ([`detach`], [`attach`]);
//! products run inside a parallel loop belong to no span.

use std::cell::RefCell;
use std::time::Instant;

/// One finished span: how deep it was nested, what it timed, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub depth: usize,
    pub label: String,
    pub seconds: f64,
}

/// The spans of one thread, in the order they opened.
#[derive(Debug, Default)]
pub struct Recorder {
    entries: Vec<Entry>,
    depth: usize,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Starts recording on this thread (dropping anything recorded and not yet taken).
pub fn start() {
    attach(Some(Recorder::default()));
}

/// Stops recording on this thread and returns the spans, in the order they opened.
pub fn finish() -> Vec<Entry> {
    detach()
        .map(|recorder| recorder.entries)
        .unwrap_or_default()
}

/// Takes this thread's recorder, to [`attach`] it to the thread that goes on with the work.
pub fn detach() -> Option<Recorder> {
    RECORDER.with(|cell| cell.borrow_mut().take())
}

/// Gives this thread `recorder` (what [`detach`] took, or `None`).
pub fn attach(recorder: Option<Recorder>) {
    RECORDER.with(|cell| *cell.borrow_mut() = recorder);
}

/// An open span; it records its time when dropped.
#[must_use = "a span times until it is dropped"]
pub struct Span {
    open: Option<(usize, Instant)>,
}

/// Opens a span labelled `label()` (built only while this thread records).
pub fn span(label: impl FnOnce() -> String) -> Span {
    let index = RECORDER.with(|cell| {
        let mut recorder = cell.borrow_mut();
        let recorder = recorder.as_mut()?;
        recorder.entries.push(Entry {
            depth: recorder.depth,
            label: label(),
            seconds: 0.0,
        });
        recorder.depth += 1;
        Some(recorder.entries.len() - 1)
    });
    Span {
        open: index.map(|index| (index, Instant::now())),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((index, started)) = self.open.take() {
            let seconds = started.elapsed().as_secs_f64();
            RECORDER.with(|cell| {
                if let Some(recorder) = cell.borrow_mut().as_mut() {
                    recorder.depth = recorder.depth.saturating_sub(1);
                    if let Some(entry) = recorder.entries.get_mut(index) {
                        entry.seconds = seconds;
                    }
                }
            });
        }
    }
}

/// Runs `f` inside a span labelled `label()`.
pub fn timed<R>(label: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
    let _span = span(label);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_nest_in_the_order_they_open_and_record_nothing_when_off() {
        start();
        {
            let _outer = span(|| "outer".to_string());
            timed(
                || "first".to_string(),
                || std::thread::sleep(std::time::Duration::from_millis(2)),
            );
            timed(|| "second".to_string(), || ());
        }
        let entries = finish();
        let shape: Vec<(usize, &str)> = entries
            .iter()
            .map(|entry| (entry.depth, entry.label.as_str()))
            .collect();
        assert_eq!(shape, [(0, "outer"), (1, "first"), (1, "second")]);
        assert!(entries[1].seconds >= 0.002, "{entries:?}");
        assert!(entries[0].seconds >= entries[1].seconds + entries[2].seconds);
        timed(|| unreachable!("no label is built while off"), || ());
        assert!(finish().is_empty());
    }

    #[test]
    fn a_recorder_follows_the_work_to_another_thread() {
        start();
        let recorder = detach();
        let recorder = std::thread::spawn(move || {
            attach(recorder);
            timed(|| "on the other thread".to_string(), || ());
            detach()
        })
        .join()
        .expect("the thread ran");
        timed(
            || unreachable!("detached: this thread records nothing"),
            || (),
        );
        attach(recorder);
        let labels: Vec<String> = finish().into_iter().map(|entry| entry.label).collect();
        assert_eq!(labels, ["on the other thread"]);
    }
}
