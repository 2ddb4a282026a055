//! Python bindings: `nanochat_jax._rustbpe.train(texts, vocab_size, pattern=SPLIT_PATTERN,
//! batch_bytes=16 MiB) -> (ranks, stats)`.
//!
//! Documents are pulled from the Python iterator (holding the GIL) into bounded batches; each batch
//! is split and counted on a worker thread (all cores through rayon, no GIL) while the next batch
//! is being pulled, so at most two batches are in memory.

use std::thread::{self, JoinHandle};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::{check_vocab_size, finish, ChunkCounter, TrainError, SPLIT_PATTERN};

impl From<TrainError> for PyErr {
    fn from(e: TrainError) -> PyErr {
        PyValueError::new_err(e.to_string())
    }
}

/// Valid UTF-8 text of one document; invalid sequences become U+FFFD and are counted.
fn document_text(item: &Bound<'_, PyAny>, replaced: &mut u64) -> PyResult<String> {
    if let Ok(s) = item.downcast::<PyString>() {
        if let Ok(text) = s.to_str() {
            return Ok(text.to_owned());
        }
        // Lone surrogates: recover the original bytes (surrogateescape) where they came from a
        // decode, else encode them as they are; either way they end up replaced below.
        let bytes = s
            .call_method1("encode", ("utf-8", "surrogateescape"))
            .or_else(|_| s.call_method1("encode", ("utf-8", "surrogatepass")))?;
        return Ok(lossy(bytes.downcast::<PyBytes>()?.as_bytes(), replaced));
    }
    if let Ok(b) = item.downcast::<PyBytes>() {
        return Ok(lossy(b.as_bytes(), replaced));
    }
    Err(PyTypeError::new_err(format!("training documents must be str or bytes, got {}", item.get_type().name()?)))
}

fn lossy(bytes: &[u8], replaced: &mut u64) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            out.push(char::REPLACEMENT_CHARACTER);
            *replaced += 1;
        }
    }
    out
}

/// Mergeable ranks as (token bytes, rank) pairs, and the stats of the text read.
type Trained<'py> = (Vec<(Bound<'py, PyBytes>, usize)>, Bound<'py, PyDict>);

type Worker = JoinHandle<(ChunkCounter, Result<(), TrainError>)>;

fn join(py: Python<'_>, worker: Worker) -> PyResult<ChunkCounter> {
    let (counter, result) =
        py.allow_threads(|| worker.join()).map_err(|_| PyValueError::new_err("BPE counting thread panicked"))?;
    result?;
    Ok(counter)
}

#[pyfunction]
#[pyo3(signature = (texts, vocab_size, pattern = SPLIT_PATTERN, batch_bytes = 16 << 20))]
fn train<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
    vocab_size: usize,
    pattern: &str,
    batch_bytes: usize,
) -> PyResult<Trained<'py>> {
    check_vocab_size(vocab_size)?;
    let mut counter = Some(ChunkCounter::new(pattern)?);
    let mut worker: Option<Worker> = None;
    let (mut docs, mut bytes, mut replaced) = (0u64, 0u64, 0u64);
    let mut it = texts.try_iter()?;
    loop {
        let mut batch: Vec<String> = Vec::new();
        let mut batch_len = 0;
        while batch_len < batch_bytes.max(1) {
            let Some(item) = it.next() else { break };
            let text = document_text(&item?, &mut replaced)?;
            if !text.is_empty() {
                batch_len += text.len();
                batch.push(text);
            }
        }
        if let Some(w) = worker.take() {
            counter = Some(join(py, w)?);
        }
        if batch.is_empty() {
            break;
        }
        docs += batch.len() as u64;
        bytes += batch_len as u64;
        let mut c = counter.take().unwrap();
        worker = Some(thread::spawn(move || {
            let r = c.add_batch(&batch);
            (c, r)
        }));
    }
    let counter = counter.unwrap();
    let tokens = py.allow_threads(|| finish(counter, vocab_size))?;
    let ranks = tokens.iter().enumerate().map(|(rank, t)| (PyBytes::new(py, t), rank)).collect();
    let stats = PyDict::new(py);
    stats.set_item("documents", docs)?;
    stats.set_item("bytes", bytes)?;
    stats.set_item("replaced", replaced)?;
    Ok((ranks, stats))
}

#[pymodule]
fn _rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SPLIT_PATTERN", SPLIT_PATTERN)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    Ok(())
}
