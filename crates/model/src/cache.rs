//! The key/value cache for incremental decoding.
//!
//! Each layer's keys and values live in one buffer allocated for the whole generation,
//! `(B, KV, capacity, head_dim)`, written in place with `slice_assign`: growing a cache with
//! `cat` copies every cached key at every step (measured at 13% of a batch-16 decode step).

use burn::tensor::{Device, Tensor};

use crate::config::LlamaConfig;

#[derive(Debug, Clone)]
pub struct LayerCache {
    k: Tensor<4>,
    v: Tensor<4>,
    len: usize,
}

impl LayerCache {
    /// Appends `(B, KV, T, hd)` keys and values; returns all keys and values so far,
    /// `(B, KV, len + T, hd)`.
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [b, kvh, t, hd] = k.dims();
        let cap = self.k.dims()[2];
        assert!(
            self.len + t <= cap,
            "KV cache overflow: {} + {t} > capacity {cap}",
            self.len
        );
        let (start, end) = (self.len, self.len + t);
        // Take the buffers out so that `slice_assign` sees a uniquely owned tensor and can write
        // in place instead of copying.
        let placeholder = || Tensor::<4>::empty([1, 1, 1, 1], &k.device());
        let kbuf = std::mem::replace(&mut self.k, placeholder());
        let vbuf = std::mem::replace(&mut self.v, placeholder());
        self.k = kbuf.slice_assign([0..b, 0..kvh, start..end, 0..hd], k);
        self.v = vbuf.slice_assign([0..b, 0..kvh, start..end, 0..hd], v);
        self.len = end;
        (
            self.k.clone().slice([0..b, 0..kvh, 0..end, 0..hd]),
            self.v.clone().slice([0..b, 0..kvh, 0..end, 0..hd]),
        )
    }
}

/// One [`LayerCache`] per decoder layer, all of the same length.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub batch: usize,
    pub capacity: usize,
}

impl KvCache {
    pub fn new(config: &LlamaConfig, batch: usize, capacity: usize, device: &Device) -> Self {
        let shape = [batch, config.kv_heads(), capacity, config.head_dim()];
        let layers = (0..config.num_hidden_layers)
            .map(|_| LayerCache {
                k: Tensor::zeros(shape, device),
                v: Tensor::zeros(shape, device),
                len: 0,
            })
            .collect();
        KvCache {
            layers,
            batch,
            capacity,
        }
    }

    /// Number of positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
