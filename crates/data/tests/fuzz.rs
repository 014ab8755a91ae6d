//! Fuzz tests of the dataset readers (NPY, IDX raw and gzip, CIFAR-10 binary):
//! valid files mutated thousands of times (bit flips, truncations, size fields
//! and header numbers set to extremes). Every mutant must be read or refused
//! with an error; none may panic, abort on a huge allocation or hang.

use hvp_data::{npy_bytes as npy, Batch, Cifar10, Dataset, Idx, NpyDataset};
use hvp_io::fuzz::{run_cases, Mutator};
use std::io::Write;
use std::path::Path;

const CASES: u64 = 2000;

/// A fresh scratch folder, removed when the returned guard drops.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("hvp-fuzz-{tag}-"))
        .tempdir()
        .unwrap()
}

/// Reads every example of a dataset that opened, as a command would.
fn read_all(ds: &dyn Dataset) {
    let mut b = Batch::default();
    let idx: Vec<usize> = (0..ds.len().min(64)).collect();
    let _ = ds.read(&idx, &mut b);
    for i in 0..ds.len().min(64) {
        let _ = ds.label(i);
    }
}

fn expect_no_panics(what: &str, panics: Vec<(u64, String)>) {
    assert!(
        panics.is_empty(),
        "{what}: {} panics, first: {:?}",
        panics.len(),
        panics.first()
    );
}

#[test]
fn npy_reader_survives_mutated_files() {
    let scratch = temp_dir("npy");
    let d = scratch.path();
    let x: Vec<u8> = (0..6 * 16).flat_map(|i| (i as f32 * 0.1).to_le_bytes()).collect();
    let y: Vec<u8> = (0..6i64).flat_map(|i| (i % 3).to_le_bytes()).collect();
    let t: Vec<u8> = (0..12).flat_map(|i| (i as f64).to_le_bytes()).collect();
    let inputs = npy("<f4", &[6, 1, 4, 4], &x);
    let labels = npy("<i8", &[6], &y);
    let targets = npy("<f8", &[6, 2], &t);
    let (xp, yp) = (d.join("x.npy"), d.join("y.npy"));
    let mut rejected = 0;
    let panics = run_cases(CASES, |seed| {
        let mut m = Mutator::new(seed);
        let (xa, ya) = match seed % 3 {
            0 => (m.mutate(&inputs), labels.clone()),
            1 => (inputs.clone(), m.mutate(&labels)),
            _ => (inputs.clone(), m.mutate(&targets)),
        };
        std::fs::write(&xp, xa).unwrap();
        std::fs::write(&yp, ya).unwrap();
        match NpyDataset::open(&xp, &yp) {
            Ok(ds) => read_all(&ds),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                rejected += 1;
            }
        }
    });
    expect_no_panics("NPY", panics);
    assert!(rejected > CASES / 4, "only {rejected} of {CASES} mutants rejected");
}

fn idx_files(dir: &Path, gz: bool, images: &[u8], labels: &[u8]) {
    for (stem, bytes) in [("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)] {
        let _ = std::fs::remove_file(dir.join(stem));
        let _ = std::fs::remove_file(dir.join(format!("{stem}.gz")));
        if gz {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(bytes).unwrap();
            std::fs::write(dir.join(format!("{stem}.gz")), enc.finish().unwrap()).unwrap();
        } else {
            std::fs::write(dir.join(stem), bytes).unwrap();
        }
    }
}

#[test]
fn idx_reader_survives_mutated_headers_raw_and_gzipped() {
    let scratch = temp_dir("idx");
    let d = scratch.path();
    let mut images = vec![0, 0, 8, 3];
    for v in [10u32, 28, 28] {
        images.extend(v.to_be_bytes());
    }
    images.extend((0..10 * 784).map(|i| (i % 251) as u8));
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(10u32.to_be_bytes());
    labels.extend((0..10).map(|i| (i % 10) as u8));
    let mut rejected = 0;
    let panics = run_cases(CASES, |seed| {
        let mut m = Mutator::new(seed);
        // Mutate the headers mostly (the pixels are read as they are).
        let cut = |v: &[u8], n: usize| -> Vec<u8> { v[..n.min(v.len())].to_vec() };
        let (im, lb) = if seed % 2 == 0 {
            let mut h = m.mutate(&cut(&images, 40));
            h.extend(&images[40..]);
            (h, labels.clone())
        } else {
            (images.clone(), m.mutate(&labels))
        };
        idx_files(d, seed % 4 < 2, &im, &lb);
        match Idx::open(d, false) {
            Ok(ds) => read_all(&ds),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                rejected += 1;
            }
        }
    });
    expect_no_panics("IDX", panics);
    assert!(rejected > CASES / 4, "only {rejected} of {CASES} mutants rejected");
    // Damaged gzip streams themselves: flipped bits and truncations.
    let panics = run_cases(CASES / 4, |seed| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&images).unwrap();
        let gz = Mutator::new(seed).mutate(&enc.finish().unwrap());
        std::fs::write(d.join("t10k-images-idx3-ubyte.gz"), gz).unwrap();
        if let Ok(ds) = Idx::open(d, false) {
            read_all(&ds)
        }
    });
    expect_no_panics("IDX gzip", panics);
}

#[test]
fn gzip_bomb_is_refused_before_inflating_beyond_the_declared_size() {
    let scratch = temp_dir("bomb");
    let d = scratch.path();
    // A header declaring 10 images of 28x28, then 200 MB of zeros.
    let mut images = vec![0, 0, 8, 3];
    for v in [10u32, 28, 28] {
        images.extend(v.to_be_bytes());
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&images).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..200 {
        enc.write_all(&zeros).unwrap();
    }
    let gz = enc.finish().unwrap();
    assert!(gz.len() < 1 << 20, "the bomb is small: {} bytes", gz.len());
    std::fs::write(d.join("t10k-images-idx3-ubyte.gz"), gz).unwrap();
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(10u32.to_be_bytes());
    labels.extend([0u8; 10]);
    std::fs::write(d.join("t10k-labels-idx1-ubyte"), labels).unwrap();
    let start = std::time::Instant::now();
    let ds = Idx::open(d, false).expect("the declared 10 images are read, the rest ignored");
    assert_eq!(ds.len(), 10);
    assert!(
        start.elapsed().as_secs_f64() < 2.0,
        "inflated far beyond the header: {:?}",
        start.elapsed()
    );
    // A header declaring 4 G images of 64 K x 64 K pixels is refused at once.
    let mut huge = vec![0, 0, 8, 3];
    for v in [u32::MAX, 65535, 65535] {
        huge.extend(v.to_be_bytes());
    }
    std::fs::write(d.join("t10k-images-idx3-ubyte"), &huge).unwrap();
    let _ = std::fs::remove_file(d.join("t10k-images-idx3-ubyte.gz"));
    let e = Idx::open(d, false).err().expect("absurd header");
    assert!(
        e.to_string().contains("header") || e.to_string().contains("overflow"),
        "{e}"
    );
}

#[test]
fn cifar_reader_survives_mutated_batches() {
    let scratch = temp_dir("cifar");
    let d = scratch.path();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/cifar10/test_batch.bin");
    let valid = std::fs::read(fixture).unwrap();
    let mut rejected = 0;
    let panics = run_cases(CASES / 2, |seed| {
        std::fs::write(d.join("test_batch.bin"), Mutator::new(seed).mutate(&valid)).unwrap();
        match Cifar10::open(d, false) {
            Ok(ds) => read_all(&ds),
            Err(_) => rejected += 1,
        }
    });
    expect_no_panics("CIFAR-10", panics);
    assert!(rejected > 0);
}
