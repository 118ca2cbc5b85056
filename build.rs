//! Link flags that tch programs need but torch-sys cannot set for them.
//!
//! * An rpath to the libtorch the build used, so the binary and the tests run
//!   without `LD_LIBRARY_PATH`. `dlopen` finds `libtorch_cuda.so` by it too:
//!   that library is not linked: `device::cuda_support` loads it when a
//!   command asks for CUDA, which keeps its 350 MB out of CPU runs.
//! * `csrc/aten_context.cpp`, compiled against the same libtorch's headers:
//!   the `torch.backends.mkldnn.enabled` switch, which tch does not bind.

use std::path::Path;

fn main() {
    // Set by torch-sys (`links = "tch"`, key `libtorch_lib`).
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc/aten_context.cpp");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report its libtorch lib dir (DEP_TCH_LIBTORCH_LIB)");
    let lib = Path::new(&lib);
    let lib = lib.canonicalize().unwrap_or_else(|_| lib.to_path_buf());
    // Both a libtorch download and the PyTorch wheel put `include/` next to `lib/`.
    let include = lib.with_file_name("include");
    assert!(
        include.join("ATen/Context.h").is_file(),
        "no ATen/Context.h under {}: the libtorch at {} lacks its C++ headers",
        include.display(),
        lib.display()
    );
    cc::Build::new()
        .cpp(true)
        .file("csrc/aten_context.cpp")
        .include(&include)
        .flag("-std=c++17")
        .warnings(false)
        .compile("tch_cifar_aten_context");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
