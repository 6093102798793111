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

/// glibc's default mmap/trim thresholds return freed activation buffers to the OS and fault
/// them back in at the next step; measured at up to 40% of a CPU training step. Raises them once
/// (call at start-up) so freed blocks stay in the heap. `kiln` calls it unless
/// `KILN_DEFAULT_MALLOC` is set, and so do the benchmark examples, so that they measure what
/// `kiln` runs: with glibc's defaults a fresh `(N, V)` buffer is faulted in page by page (a
/// 2048 x 256 x 4096 product measured 136 against 219 GFLOP/s). `kiln` also restarts itself
/// onto glibc's huge pages, which the examples do not: run them with
/// `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` to measure that too.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// A float tensor's values on the host, as f32.
pub fn to_vec<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>()
        .expect("reading a float tensor back to the host")
}
