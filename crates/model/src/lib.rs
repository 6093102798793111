//! Kiln's model crate: the Llama-family decoder on burn, its KV cache, and Hugging Face
//! model directories (config.json, model.safetensors, tokenizer files).

pub mod adapter_dir;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fused;
pub mod layers;
pub mod llama;
pub mod model_dir;
pub mod peft;
pub mod reward;
pub(crate) mod rng;

pub use burn;
pub use cache::KvCache;
pub use config::LlamaConfig;
pub use error::ModelError;
pub use llama::{cross_entropy, token_logprobs, ForwardInput, Llama, Packing};
pub use model_dir::ModelDir;

use burn::tensor::Device;

/// The device every Kiln command computes on: the one place the backend is chosen. The default
/// build runs on burn's `flex` CPU backend; a build with the `cuda` feature runs on the first
/// CUDA GPU, one with `wgpu` or `vulkan` on the GPU wgpu prefers (`CUBECL_WGPU_DEFAULT_DEVICE`
/// picks another).
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        return Device::cuda(0);
    }
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    {
        return Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    }
    #[allow(unreachable_code)]
    Device::flex()
}

/// Sets the number of CPU threads used by the tensor backend (0 = all cores). Call before any
/// tensor work.
pub fn set_threads(n: usize) {
    if n > 0 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// A float tensor's values on the host, as f32.
pub fn to_vec<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>()
        .expect("reading a float tensor back to the host")
}
