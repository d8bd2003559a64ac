//! Prints the directory of the simulated GPU built with this crate (libcuda.so.1, libnvidia-ml.so.1, nvidia-smi
//! and the test clients), for scripts such as the README's demo.
fn main() {
    println!("{}", vgpu_integration::sim_dir().display());
}
