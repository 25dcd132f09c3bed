//! Build script: checks the libtorch that `.libtorch` points to, compiles the C++ (ATen) and,
//! with `--features cuda`, CUDA sources in `kernels/` into static archives, and emits the link
//! arguments that let every binary and test find libtorch (and really load libtorch_cuda)
//! without LD_LIBRARY_PATH.
//!
//! Why these link arguments: torch-sys links `-ltorch_cpu -ltorch -lc10` but Rust passes
//! `--as-needed`, so a binary that calls no CUDA symbol directly would drop libtorch_cuda and
//! `tch::Cuda::is_available()` would report false on a GPU machine. `--no-as-needed -ltorch
//! -ltorch_cuda` keeps them, and the rpath points at the wheel's `torch/lib`, whose own RUNPATH
//! finds `site-packages/nvidia/*` (so torch/lib must stay inside the wheel's layout).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TORCH_VERSION: &str = "2.11.0";
const SETUP_HINT: &str = "run `python3 scripts/setup.py` from the repository root first";

/// Kernels compiled once per CPU instruction set, dispatched at run time like ATen's own kernels
/// (see kernels/dispatch.h). Each entry: (suffix, CPU_CAPABILITY, extra flags).
const CPU_VARIANTS: &[(&str, &str, &[&str])] = &[
    ("default", "DEFAULT", &[]),
    ("avx2", "AVX2", &["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mpopcnt"]),
    (
        "avx512",
        "AVX512",
        &[
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-mf16c",
            "-mbmi",
            "-mbmi2",
            "-mlzcnt",
            "-mpopcnt",
        ],
    ),
];

/// Sources compiled once with the default flags.
const CPP_SOURCES: &[&str] = &[
    "kernels/ops/bias_gelu.cpp",
    "kernels/ops/adamw.cpp",
    "kernels/ops/linear.cpp",
    "kernels/ops/llama.cpp",
    "kernels/ops/qmatmul.cpp",
    "kernels/ops/dropout.cpp",
    "kernels/runtime/shim.cpp",
    "kernels/runtime/profiler.cpp",
    "kernels/runtime/recompute.cpp",
    "kernels/ops/cross_entropy.cpp",
    "kernels/runtime/cuda_graph.cpp",
];
/// c10d (torch.distributed's engine) sources: compiled with -DUSE_C10D_GLOO and the gloo
/// declaration stand-in in kernels/dist/gloo_stub (the wheel ships no gloo headers).
const C10D_SOURCES: &[&str] = &["kernels/dist/c10d.cpp", "kernels/dist/sync_batch_norm.cpp"];
/// ProcessGroupNCCL (feature `cuda`): needs the CUDA runtime and NCCL headers from the wheel.
const NCCL_SOURCES: &[&str] = &["kernels/dist/c10d_nccl.cpp"];
/// Sources compiled once per CPU_VARIANTS entry.
const CPU_KERNEL_SOURCES: &[&str] = &[
    "kernels/ops/bias_gelu_cpu.cpp",
    "kernels/ops/cross_entropy_cpu.cpp",
    "kernels/ops/gemv_cpu.cpp",
    "kernels/ops/llama_cpu.cpp",
    "kernels/ops/qmatmul_cpu.cpp",
    "kernels/ops/dropout_cpu.cpp",
];
/// AMX tile kernels (x86-64): compiled once with -mamx-tile -mamx-bf16, no torch headers.
const AMX_SOURCE: &str = "kernels/ops/qmatmul_amx.cpp";
/// CUDA sources (feature `cuda`).
const CUDA_SOURCES: &[&str] = &[
    "kernels/ops/bias_gelu.cu",
    "kernels/ops/cross_entropy.cu",
    "kernels/ops/qmatmul.cu",
    "kernels/runtime/cuda_graph.cu",
];
const HEADERS: &[&str] =
    &["kernels/ops.h", "kernels/dispatch.h", "kernels/dist/c10d.h", "kernels/dist/gloo_stub/gloo/decls.h"];

fn main() {
    if let Err(e) = run() {
        // A build script's error output is shown by cargo; make the cause the first line.
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    println!("cargo:rerun-if-changed=build.rs");
    for f in CPP_SOURCES
        .iter()
        .chain(C10D_SOURCES)
        .chain(NCCL_SOURCES)
        .chain(CPU_KERNEL_SOURCES)
        .chain(CUDA_SOURCES)
        .chain(std::iter::once(&AMX_SOURCE))
        .chain(HEADERS)
    {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_ARCHS");

    let libtorch = libtorch_dir()?;
    check_version(&libtorch)?;
    // torch-sys (links = "tch") reports the lib dir it linked against; prefer it so both agree.
    let lib_dir = env::var("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from).unwrap_or_else(|_| libtorch.join("lib"));
    let lib_dir =
        lib_dir.canonicalize().map_err(|e| format!("libtorch lib dir {}: {e}; {SETUP_HINT}", lib_dir.display()))?;
    let include = libtorch.join("include");
    let include_api = include.join("torch/csrc/api/include");

    let base = |cap: &str| {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .std("c++17")
            .include(&include)
            .include(&include_api)
            .include("kernels")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .define("GLOG_USE_GLOG_EXPORT", None)
            .define("CPU_CAPABILITY", cap)
            .flag("-fopenmp")
            .flag_if_supported("-Wno-unused-parameter")
            .flag_if_supported("-Wno-missing-field-initializers")
            .opt_level(3)
            .debug(false)
            .warnings(false);
        b
    };

    // 1. Plain C++ (autograd functions, FFI entry points, runtime shim).
    let mut b = base("DEFAULT");
    if cfg!(feature = "cuda") {
        b.define("COURSE_CUDA", None);
    }
    b.files(CPP_SOURCES).compile("course_ops");

    // 1b. c10d: stores, process groups, collectives, synchronised batch norm.
    let mut b = base("DEFAULT");
    b.define("USE_C10D_GLOO", None).include("kernels/dist/gloo_stub");
    if cfg!(feature = "cuda") {
        let site = libtorch.canonicalize().map_err(|e| e.to_string())?;
        let site = site.parent().ok_or("bad libtorch path")?;
        b.define("COURSE_CUDA", None)
            .define("USE_C10D_NCCL", None)
            .include(site.join("nvidia/cu13/include"))
            .include(site.join("nvidia/nccl/include"))
            .files(NCCL_SOURCES);
    }
    b.files(C10D_SOURCES).compile("course_c10d");

    // 2. CPU kernels, once per instruction set (only the portable one off x86-64; the dispatch
    // in ops/bias_gelu.cpp references the AVX variants only on x86-64 too).
    let x86 = env::var("CARGO_CFG_TARGET_ARCH").map(|a| a == "x86_64").unwrap_or(false);
    for (suffix, cap, flags) in CPU_VARIANTS.iter().filter(|v| x86 || v.1 == "DEFAULT") {
        let mut b = base(cap);
        b.define(&format!("CPU_CAPABILITY_{cap}"), None);
        // GCC's note that passing 32-byte vectors by value changed ABI in GCC 4.6: these
        // kernels are compiled and called by one compiler, so it does not apply.
        b.flag("-Wno-psabi");
        for f in *flags {
            b.flag(f);
        }
        b.files(CPU_KERNEL_SOURCES).compile(&format!("course_cpu_{suffix}"));
    }

    // 2b. AMX tiles (x86-64 only): one file with the AMX flags, entered only after its run-time
    // check (kernels/ops/qmatmul_amx.cpp).
    if x86 {
        let mut b = base("DEFAULT");
        b.flag("-mamx-tile").flag("-mamx-bf16").file(AMX_SOURCE).compile("course_amx");
    }

    // 3. CUDA kernels.
    if cfg!(feature = "cuda") {
        build_cuda(&libtorch, &include, &include_api, &lib_dir)?;
    }

    // 4. Link arguments for every binary, test and bench of this package.
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    println!("cargo:rustc-link-lib=gomp");
    Ok(())
}

fn libtorch_dir() -> Result<PathBuf, String> {
    let dir = env::var("LIBTORCH")
        .map(PathBuf::from)
        .map_err(|_| format!("LIBTORCH is not set (.cargo/config.toml sets it to .libtorch); {SETUP_HINT}"))?;
    if !dir.join("include/ATen/ATen.h").exists() {
        return Err(format!("libtorch not found at {} (no include/ATen/ATen.h); {SETUP_HINT}", dir.display()));
    }
    Ok(dir)
}

/// The PyPI wheel has `version.py`; the libtorch zip has `build-version`.
fn check_version(libtorch: &Path) -> Result<(), String> {
    let found = if let Ok(s) = std::fs::read_to_string(libtorch.join("version.py")) {
        s.lines().find_map(|l| {
            l.strip_prefix("__version__ = ").map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        })
    } else {
        std::fs::read_to_string(libtorch.join("build-version")).ok().map(|s| s.trim().to_string())
    };
    let found = found.ok_or_else(|| {
        format!("cannot read the torch version in {} (version.py or build-version); {SETUP_HINT}", libtorch.display())
    })?;
    let base = found.split('+').next().unwrap_or("");
    if base != TORCH_VERSION {
        return Err(format!(
            "libtorch at {} is torch {found}, but tch 0.24 needs exactly {TORCH_VERSION}; {SETUP_HINT} (it installs torch=={TORCH_VERSION} into .venv)",
            libtorch.display()
        ));
    }
    Ok(())
}

/// nvcc from `NVCC`, the venv (`scripts/setup.py --cuda`), or PATH.
fn find_nvcc(libtorch: &Path) -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    let site = libtorch.canonicalize().ok()?.parent()?.to_path_buf();
    for cand in ["nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc"] {
        let p = site.join(cand);
        if p.exists() {
            return Some(p);
        }
    }
    let out = Command::new("which").arg("nvcc").output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// The `cc` crate's CUDA mode passes `-ffunction-sections` straight to this nvcc and fails, so
/// nvcc is run by hand and its objects archived with `ar`.
fn build_cuda(libtorch: &Path, include: &Path, include_api: &Path, lib_dir: &Path) -> Result<(), String> {
    let nvcc =
        find_nvcc(libtorch).ok_or("feature `cuda` needs nvcc: run `python3 scripts/setup.py --cuda` (or set NVCC)")?;
    let nvcc_root = nvcc.parent().and_then(|p| p.parent()).ok_or("bad nvcc path")?.to_path_buf();
    let site = libtorch.canonicalize().map_err(|e| e.to_string())?.parent().ok_or("bad libtorch path")?.to_path_buf();
    let cu13 = site.join("nvidia/cu13");
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    // sm_80 (A100), sm_90 (H100/H200), plus PTX for newer parts.
    let archs = env::var("CUDA_ARCHS").unwrap_or_else(|_| "80;90".into());
    let mut objects = vec![];
    for src in CUDA_SOURCES {
        let obj = out_dir.join(Path::new(src).file_stem().unwrap()).with_extension("o");
        let mut cmd = Command::new(&nvcc);
        cmd.args(["-c", src, "-o"]).arg(&obj);
        cmd.args([
            "-std=c++17",
            "-O3",
            "-Xcompiler",
            "-fPIC",
            "-D_GLIBCXX_USE_CXX11_ABI=1",
            "-DCOURSE_CUDA",
            "--expt-relaxed-constexpr",
        ]);
        for a in archs.split(';').filter(|a| !a.is_empty()) {
            cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
        }
        if let Some(last) = archs.split(';').filter(|a| !a.is_empty()).last() {
            cmd.arg(format!("-gencode=arch=compute_{last},code=compute_{last}"));
        }
        for inc in [
            include.to_path_buf(),
            include_api.to_path_buf(),
            PathBuf::from("kernels"),
            cu13.join("include"),
            nvcc_root.join("include"),
        ] {
            cmd.arg("-I").arg(inc);
        }
        let status = cmd.status().map_err(|e| format!("running {}: {e}", nvcc.display()))?;
        if !status.success() {
            return Err(format!("nvcc failed on {src} ({status})"));
        }
        objects.push(obj);
    }
    let lib = out_dir.join("libcourse_cuda.a");
    let _ = std::fs::remove_file(&lib);
    let status =
        Command::new("ar").arg("crs").arg(&lib).args(&objects).status().map_err(|e| format!("running ar: {e}"))?;
    if !status.success() {
        return Err(format!("ar failed ({status})"));
    }
    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static=course_cuda");
    // cudart ships only as libcudart.so.13 in the wheel: link it by exact file name.
    let cudart_dir = cu13.join("lib");
    println!("cargo:rustc-link-search=native={}", cudart_dir.display());
    println!("cargo:rustc-link-arg=-l:libcudart.so.13");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cudart_dir.display());
    let _ = lib_dir;
    Ok(())
}
