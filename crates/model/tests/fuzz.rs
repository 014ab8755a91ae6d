//! Fuzz tests of the weights/vector reader (safetensors) and the `--arch`
//! grammar: mutated files and specs are loaded or refused, never a panic, an
//! abort on a huge allocation or a hang.

use hvp_io::fuzz::{run_cases, Mutator};
use hvp_model::{Architecture, Model, ParamVector, Weights, MAX_BUILTIN_PARAMS};
use hvp_tensor::DType;

#[test]
fn safetensors_reader_survives_mutated_files() {
    let scratch = tempfile::Builder::new().prefix("hvp-fuzz-st-").tempdir().unwrap();
    let dir = scratch.path();
    let arch: Architecture = "mlp:6,5,3".parse().unwrap();
    let model = Model::new(&arch, 1).unwrap();
    let path = dir.join("w.safetensors");
    Weights::init(&model, 0).save(&model, &path, DType::F32).unwrap();
    let valid = std::fs::read(&path).unwrap();
    let mutant = dir.join("m.safetensors");
    let mut rejected = 0;
    let panics = run_cases(3000, |seed| {
        std::fs::write(&mutant, Mutator::new(seed).mutate(&valid)).unwrap();
        let w = Weights::load(&model, &mutant);
        let v = ParamVector::load(&model, &mutant);
        let _ = Weights::load_for(&arch, &mutant);
        if w.is_err() {
            rejected += 1;
        }
        if let Ok(v) = v {
            assert!(v.all_finite(), "a vector with NaN/Inf was accepted");
        }
    });
    assert!(panics.is_empty(), "{} panics, first {:?}", panics.len(), panics.first());
    assert!(rejected > 1000, "only {rejected} mutants rejected");
}

#[test]
fn arch_grammar_survives_random_specs() {
    let kinds = [
        "mlp",
        "mlp-tanh",
        "logreg",
        "resnet-cifar",
        "resnet-cifar-tanh",
        "vit",
        "",
    ];
    let numbers = [
        "0",
        "1",
        "2",
        "10",
        "784",
        "1000",
        "65536",
        "4294967296",
        "18446744073709551615",
        "99999999999999999999",
        "-1",
        "1e3",
        " 3",
        "",
    ];
    let panics = run_cases(5000, |seed| {
        let mut m = Mutator::new(seed);
        let mut spec = kinds[m.below(kinds.len())].to_string();
        if m.below(10) > 0 {
            spec.push(':');
        }
        for k in 0..m.below(6) {
            if k > 0 {
                spec.push([',', ',', ',', ':', ';'][m.below(5)]);
            }
            spec.push_str(numbers[m.below(numbers.len())]);
        }
        if let Ok(arch) = spec.parse::<Architecture>() {
            for channels in [1, 3] {
                if let Ok(model) = Model::new(&arch, channels) {
                    assert!(
                        model.num_params() <= MAX_BUILTIN_PARAMS,
                        "{spec}: {}",
                        model.num_params()
                    );
                }
            }
        }
    });
    assert!(panics.is_empty(), "{} panics, first {:?}", panics.len(), panics.first());
    let e = "mlp:784,1000000000000,10".parse::<Architecture>().unwrap_err();
    assert!(
        e.to_string().contains("parameters") || e.to_string().contains("overflow"),
        "{e}"
    );
    let e = "resnet-cifar:2,99999,2".parse::<Architecture>().unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
}
