//! Helpers shared by the CLI tests: running the binary, temporary directories,
//! fixture paths and the deterministic weight generator of scripts/make_fixtures.py.
#![allow(dead_code)]

use hvp_model::io::{read_safetensors, write_safetensors};
use hvp_model::{Architecture, Model};
use hvp_tensor::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture(case: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(case)
}

/// The factor cache of this test process (never the user's), under Cargo's
/// scratch folder for integration tests in `target/`, so a run leaves nothing
/// in the system's temp folder; shared by the tests of one process.
pub fn test_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("factor-cache-{}", std::process::id()))
}

/// Runs `hvp` with `args`.
pub fn hvp(args: &[&str]) -> Output {
    hvp_env(args, &[])
}

/// Runs `hvp` with `args` and extra environment variables.
pub fn hvp_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvp"))
        .args(args)
        .env("HVP_CACHE_DIR", test_cache_dir())
        .envs(env.iter().copied())
        .output()
        .expect("the hvp binary runs")
}

/// Runs `hvp` with `args`, asserts success, returns stdout followed by stderr.
pub fn ok(args: &[&str]) -> String {
    let o = hvp(args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "hvp {args:?} failed: {stderr}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &stderr
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("hvp-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// All F32/F64 tensors of a safetensors file, flattened, by name.
pub fn read_flat(path: &Path) -> BTreeMap<String, Vec<f64>> {
    read_safetensors(path)
        .expect("readable safetensors")
        .into_iter()
        .filter_map(|(k, v)| v.ok().map(|t| (k, t.data)))
        .collect()
}

fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

fn uniform_stream(seed: u64, count: usize) -> Vec<f64> {
    let mut s = seed;
    (0..count)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 * 2f64.powi(-53) * 2.0 - 1.0
        })
        .collect()
}

/// The weights `generated_tensor` of scripts/make_fixtures.py writes, bit for bit.
fn generated_tensor(name: &str, shape: &[usize], seed: u64) -> Tensor<f64> {
    let n = shape.iter().product();
    let u = uniform_stream(seed ^ fnv1a(name), n);
    let v: Vec<f64> = if name.ends_with("running_var") {
        u.iter().map(|x| 1.0 + 0.5 * x).collect()
    } else if name.ends_with("running_mean") {
        u.iter().map(|x| 0.2 * x).collect()
    } else if shape.len() == 1 && name.ends_with(".weight") {
        u.iter().map(|x| 1.0 + 0.2 * x).collect()
    } else if shape.len() == 1 {
        u.iter().map(|x| 0.2 * x).collect()
    } else {
        let fan_in: usize = shape[1..].iter().product();
        u.iter().map(|x| x / (fan_in as f64).sqrt()).collect()
    };
    Tensor::new(shape.to_vec(), v).unwrap()
}

/// Writes the generated weights and vector of a fixture case to `dir`.
pub fn write_generated(arch: &str, in_channels: usize, seed: u64, weights: &Path, vector: &Path) {
    write_generated_as(arch, in_channels, seed, weights, vector, DType::F64)
}

/// [`write_generated`] with the weights stored in `weights_dtype` (F32 rounds
/// them, as an exported float32 model holds them).
pub fn write_generated_as(
    arch: &str,
    in_channels: usize,
    seed: u64,
    weights: &Path,
    vector: &Path,
    weights_dtype: DType,
) {
    let arch: Architecture = arch.parse().unwrap();
    let model = Model::new(&arch, in_channels).unwrap();
    let named: Vec<(String, Tensor<f64>)> = model
        .params
        .iter()
        .chain(&model.buffers)
        .map(|s| (s.name.clone(), generated_tensor(&s.name, &s.shape, seed)))
        .collect();
    write_safetensors(weights, &named, weights_dtype).unwrap();
    let v: Vec<(String, Tensor<f64>)> = model
        .params
        .iter()
        .map(|s| {
            let u = uniform_stream(seed ^ fnv1a(&format!("vector:{}", s.name)), s.numel());
            (s.name.clone(), Tensor::new(s.shape.clone(), u).unwrap())
        })
        .collect();
    write_safetensors(vector, &v, DType::F64).unwrap();
}

/// Relative error, over all `kind/NAME` tensors of a fixture's
/// `expected.safetensors`, of the tensors hvp wrote to `out`.
pub fn relative_error(expected: &Path, kind: &str, out: &Path, cap: Option<usize>) -> f64 {
    let expected = read_flat(expected);
    let got = read_flat(out);
    let (mut diff, mut norm, mut count) = (0.0, 0.0, 0);
    for (key, want) in expected.iter().filter(|(k, _)| k.starts_with(&format!("{kind}/"))) {
        let name = &key[kind.len() + 1..];
        let mine = subset(
            got.get(name)
                .unwrap_or_else(|| panic!("{}: output lacks {name}", out.display())),
            cap,
        );
        assert_eq!(mine.len(), want.len(), "{name} length");
        for (a, b) in mine.iter().zip(want) {
            diff += (a - b) * (a - b);
            norm += b * b;
        }
        count += 1;
    }
    assert!(count > 0, "no {kind} tensors in the fixture");
    (diff / norm).sqrt()
}

/// Every k-th element, k = ceil(len / cap), as the fixture script stores.
pub fn subset(v: &[f64], cap: Option<usize>) -> Vec<f64> {
    match cap {
        Some(c) if v.len() > c => v.iter().step_by(v.len().div_ceil(c)).copied().collect(),
        _ => v.to_vec(),
    }
}

/// Writes an NPY v1 file for test inputs.
pub fn write_npy(path: &Path, descr: &str, shape: &[usize], bytes: &[u8]) {
    std::fs::write(path, hvp_data::npy_bytes(descr, shape, bytes)).unwrap();
}

pub fn write_npy_f32(path: &Path, shape: &[usize], v: &[f32]) {
    write_npy(
        path,
        "<f4",
        shape,
        &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
    );
}

pub fn write_npy_i64(path: &Path, v: &[i64]) {
    write_npy(
        path,
        "<i8",
        &[v.len()],
        &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
    );
}
