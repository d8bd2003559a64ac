//! libvgpu.so: preloaded into every process of a container, it enforces the container's GPU slice.
//!
//! Loading does one thing: find glibc's `dlsym` (so our `dlsym` can forward). Everything else (config,
//! shared cache, threads) waits for the first hooked call. The hooked symbols are listed once, in
//! [`hooks`]; the rules live in safe modules: [`config`] (limits and bad input), [`process`] (accounting
//! against the container's shared cache), [`context`] (what the device holds beyond allocations),
//! [`window`] and [`pacing`] (compute share).

pub mod config;
pub mod context;
pub mod cuda;
pub mod hooks;
pub mod log;
pub mod pacing;
pub mod process;
pub mod real;
pub mod window;

extern "C" fn on_load() {
    real::init_real_dlsym();
}

#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;
