//! Next-token loss of a model on documents, each evaluated independently: BOS (when the
//! tokenizer has one) then the document's tokens, in windows of the model's context. Bits per
//! byte divide the total negative log-likelihood (in bits) by the UTF-8 bytes predicted, so the
//! number compares across tokenizers.

use kiln_model::burn::tensor::{Int, Tensor, TensorData};
use kiln_model::{ForwardInput, Llama, ModelError};
use kiln_tokenizer::Tokenizer;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct LossReport {
    pub loss: f64,
    pub perplexity: f64,
    pub bits_per_byte: f64,
    pub tokens: usize,
    pub bytes: usize,
    pub documents: usize,
}

/// A window of tokens to score: `input[j]` predicts `input[j + 1]`.
struct Window {
    tokens: Vec<u32>,
}

/// Evaluates `docs` with batches of `batch` windows.
pub fn evaluate_loss(
    model: &Llama,
    tokenizer: &Tokenizer,
    docs: &[String],
    batch: usize,
) -> Result<LossReport, ModelError> {
    let ctx = model.config.max_position_embeddings;
    let mut windows = Vec::new();
    let mut bytes = 0usize;
    for doc in docs {
        let bos = tokenizer.bos_id();
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(tokenizer.encode(doc)?);
        if ids.len() < 2 {
            continue;
        }
        // Every byte of the document is predicted when a BOS leads; else all but the first token's.
        bytes += if bos.is_some() {
            doc.len()
        } else {
            tokenizer.decode(&ids[1..], false)?.len()
        };
        model.check_tokens(&ids[..ids.len().min(ctx)])?;
        // Windows of ctx tokens overlapping by one so that every token after the first is predicted once.
        let mut start = 0;
        while start + 1 < ids.len() {
            let end = (start + ctx).min(ids.len());
            windows.push(Window {
                tokens: ids[start..end].to_vec(),
            });
            start = end - 1;
        }
    }
    let device = model.device();
    let mut nll = 0.0f64;
    let mut count = 0usize;
    // Longest first so that a batch wastes little padding.
    windows.sort_by_key(|w| std::cmp::Reverse(w.tokens.len()));
    for chunk in windows.chunks(batch.max(1)) {
        let t = chunk[0].tokens.len();
        let b = chunk.len();
        let mut rows = Vec::with_capacity(b);
        let mut valid = Vec::with_capacity(b);
        let mut targets = Vec::with_capacity(b * (t - 1));
        let mut weights = Vec::with_capacity(b * (t - 1));
        for w in chunk {
            let n = w.tokens.len();
            let mut row = w.tokens.clone();
            row.resize(t, 0);
            valid.push((0..t).map(|j| j < n).collect::<Vec<_>>());
            for j in 1..t {
                targets.push(if j < n { w.tokens[j] as i64 } else { 0 });
                weights.push(if j < n { 1.0f32 } else { 0.0 });
            }
            rows.push(row);
        }
        let input = ForwardInput::padded(&rows, &valid, &device);
        let hidden = model.hidden(&input, None);
        let d = model.config.hidden_size;
        let n = b * (t - 1);
        let hidden = hidden.slice([0..b, 0..t - 1, 0..d]).reshape([n, d]);
        let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
        let lp = model
            .target_logprobs(hidden, targets)
            .try_into_vec_as::<f32>()
            .expect("f32 tensor");
        for (l, w) in lp.iter().zip(&weights) {
            if *w > 0.0 {
                nll -= *l as f64;
                count += 1;
            }
        }
    }
    let loss = nll / count.max(1) as f64;
    Ok(LossReport {
        loss,
        perplexity: loss.exp(),
        bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens: count,
        bytes,
        documents: docs.len(),
    })
}
