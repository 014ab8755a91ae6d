//! The readers on real files bundled in the repo.

use hvp_data::{open_spec, Batch, Dataset, Padded, Subset};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn fashion_mnist_subset() {
    let spec = format!("mnist:{}", root().join("data/fashion-mnist-subset").display());
    let train = open_spec(&spec).unwrap();
    let test = open_spec(&format!("{spec}:test")).unwrap();
    assert_eq!((train.len(), test.len()), (2000, 500));
    assert_eq!(train.sample_shape(), vec![1, 28, 28]);
    // The first Fashion-MNIST training image is an ankle boot (9), the first test one too.
    assert_eq!((train.label(0), test.label(0)), (9, 9));
    let mut b = Batch::default();
    train.read(&[0, 1], &mut b).unwrap();
    assert_eq!(b.labels, vec![9, 0]);
    assert_eq!(b.x.len(), 2 * 784);
    assert!(b.x.iter().all(|&v| (0.0..=1.0).contains(&v)));
    assert!(b.x.contains(&1.0), "pixels are scaled by 255");
    // Padding keeps the pixels and adds a zero border.
    let padded = Padded::new(train, 2).unwrap();
    assert_eq!(padded.sample_shape(), vec![1, 32, 32]);
    let mut p = Batch::default();
    padded.read(&[0], &mut p).unwrap();
    assert_eq!(p.x[..64].iter().sum::<f64>(), 0.0);
    assert_eq!(p.x[2 * 32 + 2..2 * 32 + 30], b.x[..28]);
    let first = Subset::first(&padded, 10);
    assert_eq!(first.len(), 10);
}

#[test]
fn cifar10_sample() {
    let spec = format!("cifar10:{}:test", root().join("tests/fixtures/cifar10").display());
    let ds = open_spec(&spec).unwrap();
    assert_eq!(ds.len(), 20);
    let labels: Vec<usize> = (0..20).map(|i| ds.label(i)).collect();
    assert_eq!(labels, vec![3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]);
    let mut b = Batch::default();
    ds.read(&[0], &mut b).unwrap();
    // The first test image (a cat) starts 158 159 165 in its red channel.
    assert!((b.x[0] - 158.0 / 255.0).abs() < 1e-12 && (b.x[2] - 165.0 / 255.0).abs() < 1e-12);
}

#[test]
fn bad_specs_are_explained() {
    let e = open_spec("imagenet:/tmp").err().unwrap().to_string();
    assert!(e.contains("unknown dataset kind"), "{e}");
    let e = open_spec("mnist:/nonexistent/dir").err().unwrap().to_string();
    assert!(
        e.contains("cannot read /nonexistent/dir/train-images-idx3-ubyte"),
        "{e}"
    );
    let e = open_spec("cifar10:/nonexistent").err().unwrap().to_string();
    assert!(e.contains("data_batch_1.bin"), "{e}");
}
