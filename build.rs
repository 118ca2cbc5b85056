//! Link flags that tch programs need but torch-sys cannot set for them.
//!
//! * An rpath to the libtorch the build used, so the binary and the tests run
//!   without `LD_LIBRARY_PATH`. `dlopen` finds `libtorch_cuda.so` by it too:
//!   that library is not linked: `device::cuda_support` loads it when a
//!   command asks for CUDA, which keeps its 350 MB out of CPU runs.
//! * `csrc/`, compiled against the same libtorch's headers: the
//!   `torch.backends.mkldnn.enabled` switch (`aten_context.cpp`), CPU
//!   autocast in bfloat16 (`autocast.cpp`), the
//!   TorchScript module `export` writes (`script_module.cpp`) and c10d's
//!   store, Gloo process group and collectives (`distributed.cpp`) and
//!   libtorch's profiler (`profiler.cpp`), none of which tch binds; and
//!   c10d's NCCL process group as a shared library of its own
//!   (`distributed_nccl.cpp`), where CUDA's headers are at hand.

use std::path::Path;

/// This project's own C++, compiled into one static library.
const SOURCES: [&str; 5] = [
    "csrc/aten_context.cpp",
    "csrc/autocast.cpp",
    "csrc/script_module.cpp",
    "csrc/distributed.cpp",
    "csrc/profiler.cpp",
];

fn main() {
    // Set by torch-sys (`links = "tch"`, key `libtorch_lib`).
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    for file in SOURCES {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-changed=csrc/gloo");
    println!("cargo:rerun-if-changed=csrc/ffi.h");
    println!("cargo:rerun-if-changed=csrc/distributed.h");
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
    // script_module.cpp passes std::string to libtorch, so it must use the
    // C++ ABI libtorch was built with; torch-sys reads the same variable.
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .files(SOURCES)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // The declarations ProcessGroupGloo.hpp needs of gloo (csrc/gloo/gloo/README.md).
        .include("csrc/gloo")
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        .warnings(false)
        .compile("tch_cifar_csrc");
    check_no_gloo_symbols();
    build_nccl(&lib, &include, &cxx11_abi);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}

/// csrc/gloo declares gloo's names only so that ProcessGroupGloo.hpp
/// compiles: no code of this project may call into gloo itself, where those
/// declarations would have to match gloo's real layout. Every gloo object is
/// made and used by libtorch's own functions, so the compiled library must
/// need no `gloo::` symbol. Checked with binutils' `nm` where it is installed.
fn check_no_gloo_symbols() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let lib = Path::new(&out).join("libtch_cifar_csrc.a");
    let Ok(listed) = std::process::Command::new("nm")
        .args(["--undefined-only", "--demangle"])
        .arg(&lib)
        .output()
    else {
        println!("cargo:warning=nm not found: the check that csrc/ calls no gloo code is skipped");
        return;
    };
    let text = String::from_utf8_lossy(&listed.stdout);
    let gloo: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.trim_start()
                .strip_prefix("U ")
                .is_some_and(|name| name.contains("gloo::"))
        })
        .collect();
    assert!(
        gloo.is_empty(),
        "csrc/ calls gloo directly, which csrc/gloo's declarations cannot make sound:\n{}",
        gloo.join("\n")
    );
}

/// c10d's NCCL process group (csrc/distributed_nccl.cpp), where CUDA's and
/// NCCL's headers are beside the libtorch (the PyTorch wheel's `nvidia/`
/// packages, with the CUDA runtime headers `scripts/setup-libtorch` adds):
/// a shared library that `src/distributed/nccl.rs` embeds and loads once
/// libtorch's CUDA half is loaded. Without those headers there is none, and
/// `--dist-backend nccl` says so.
fn build_nccl(lib: &Path, include: &Path, cxx11_abi: &str) {
    println!("cargo:rustc-check-cfg=cfg(tch_cifar_nccl)");
    println!("cargo:rerun-if-changed=csrc/distributed_nccl.cpp");
    println!("cargo:rerun-if-changed=csrc/distributed.h");
    let Some(nvidia) = lib
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("nvidia"))
    else {
        return;
    };
    let cuda = nvidia.join("cu13/include");
    let nccl = nvidia.join("nccl/include");
    let needed = [
        cuda.join("cuda_runtime_api.h"),
        cuda.join("crt/host_config.h"),
        cuda.join("nv/target"),
        nccl.join("nccl.h"),
    ];
    if !needed.iter().all(|p| p.exists()) {
        return;
    }
    let objects = cc::Build::new()
        .cpp(true)
        .pic(true)
        .file("csrc/distributed_nccl.cpp")
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .include(&cuda)
        .include(&nccl)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi)
        .warnings(false)
        .compile_intermediates();
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("libtch_cifar_nccl.so");
    let status = cc::Build::new()
        .cpp(true)
        .get_compiler()
        .to_command()
        .arg("-shared")
        .arg("-o")
        .arg(&out)
        .args(&objects)
        .status()
        .expect("run the C++ compiler to link libtch_cifar_nccl.so");
    assert!(status.success(), "linking libtch_cifar_nccl.so failed");
    println!("cargo:rustc-cfg=tch_cifar_nccl");
    println!("cargo:rustc-env=TCH_CIFAR_NCCL_LIB={}", out.display());
}
