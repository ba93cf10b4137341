//! State files from Rust: round trips, a file PyTorch wrote, and corrupt bytes that must give a
//! `Format` error, never a panic.

use std::path::PathBuf;

use batchnorm::state_file::{self, FileDtype, RawTensor, TensorFile};
use batchnorm::{BatchNorm, Config, ConfigOverrides, Error, Kind, Shape, TensorRef};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn trained(config: Config) -> BatchNorm<f64> {
    let mut layer = BatchNorm::new(Kind::BatchNorm2d, config).unwrap();
    let shape = Shape::new(2, layer.config().num_features, 3, 3);
    let x: Vec<f64> = (0..shape.numel()).map(|i| (i * 37 % 11) as f64 - 4.0).collect();
    let mut y = vec![0.0; x.len()];
    layer.forward(&TensorRef::contiguous(&x, shape).unwrap(), &mut y).unwrap();
    layer
}

#[test]
fn save_and_load_round_trip_every_configuration() {
    let folder = tempfile::tempdir().unwrap();
    let configs = [
        Config::new(3),
        Config { momentum: None, ..Config::new(3) },
        Config { affine: false, ..Config::new(3) },
        Config { bias: false, ..Config::new(3) },
        Config { track_running_stats: false, eps: 1e-3, ..Config::new(3) },
    ];
    for config in configs {
        let layer = trained(config.clone());
        let path = folder.path().join("bn.safetensors");
        layer.save(&path).unwrap();
        let loaded = BatchNorm::<f64>::from_file(Kind::BatchNorm2d, &path, &ConfigOverrides::default()).unwrap();
        assert_eq!(loaded.config(), &config);
        assert_eq!(loaded.state_dict(), layer.state_dict());
        // Read as float32, values are cast.
        let narrow = BatchNorm::<f32>::from_file(Kind::BatchNorm2d, &path, &ConfigOverrides::default()).unwrap();
        assert_eq!(narrow.num_batches_tracked(), layer.num_batches_tracked());
    }
}

#[test]
fn file_written_by_pytorch_loads_with_inferred_configuration() {
    let layer =
        BatchNorm::<f32>::from_file(Kind::BatchNorm2d, fixture("pytorch_bn8.safetensors"), &ConfigOverrides::default())
            .unwrap();
    assert_eq!(layer.config(), &Config::new(8));
    assert_eq!(layer.num_batches_tracked(), Some(4));
    let overrides = ConfigOverrides { eps: Some(1e-3), ..Default::default() };
    let layer = BatchNorm::<f32>::from_file(Kind::BatchNorm2d, fixture("pytorch_bn8.safetensors"), &overrides).unwrap();
    assert_eq!(layer.config().eps, 1e-3);
}

#[test]
fn missing_file_is_an_io_error_with_its_kind() {
    let err = BatchNorm::<f32>::from_file(Kind::BatchNorm2d, "/no/such/file.safetensors", &ConfigOverrides::default())
        .unwrap_err();
    assert!(matches!(err, Error::Io { kind: std::io::ErrorKind::NotFound, .. }), "{err}");
}

#[test]
fn plain_tensor_files_round_trip() {
    let file = TensorFile {
        tensors: vec![
            ("a".into(), RawTensor { dtype: FileDtype::I32, shape: vec![2], data: vec![1, 0, 0, 0, 2, 0, 0, 0] }),
            ("b".into(), RawTensor { dtype: FileDtype::F64, shape: vec![], data: 1.5f64.to_le_bytes().to_vec() }),
        ],
        metadata: [("who".to_string(), "test".to_string())].into(),
    };
    let bytes = state_file::serialize(&file).unwrap();
    let back = state_file::deserialize(&bytes).unwrap();
    assert_eq!(back.metadata, file.metadata);
    for (name, tensor) in &file.tensors {
        assert_eq!(back.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t), Some(tensor));
    }
    let wrong = RawTensor { dtype: FileDtype::F32, shape: vec![3], data: vec![0; 8] };
    let err = state_file::serialize(&TensorFile { tensors: vec![("w".into(), wrong)], ..Default::default() });
    assert!(matches!(err, Err(Error::Format(_))));
}

#[test]
fn corrupted_bytes_never_panic() {
    let valid = state_file::serialize(&trained(Config::new(4)).to_tensor_file().unwrap()).unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000 {
        let mut bytes = valid.clone();
        for _ in 0..1 + next() % 4 {
            let at = next() as usize % bytes.len();
            bytes[at] = next() as u8;
        }
        if round % 3 == 0 {
            bytes.truncate(next() as usize % (bytes.len() + 1));
        }
        if let Ok(file) = state_file::deserialize(&bytes) {
            // Whatever parses must either build a layer or say why not.
            let _ = BatchNorm::<f32>::from_tensor_file(Kind::BatchNorm2d, &file, &ConfigOverrides::default());
        }
    }
}

/// A file names the class that wrote it, and loads into any class (the keys are PyTorch's, the
/// same for the three), as a PyTorch state dict does.
#[test]
fn a_file_names_its_class_and_loads_into_any() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("bn1d.safetensors");
    let mut bn1d = BatchNorm::<f64>::new(Kind::BatchNorm1d, Config::new(3)).unwrap();
    let x: Vec<f64> = (0..12).map(|i| (i * 7 % 5) as f64).collect();
    let mut y = vec![0.0; x.len()];
    bn1d.forward(&TensorRef::contiguous_dims(&x, &[4, 3], batchnorm::Ranks::Sequence).unwrap(), &mut y).unwrap();
    bn1d.save(&path).unwrap();
    assert_eq!(BatchNorm::<f64>::recorded_kind(&state_file::load(&path).unwrap()), Some(Kind::BatchNorm1d));
    for kind in [Kind::BatchNorm1d, Kind::BatchNorm2d, Kind::BatchNorm3d] {
        let loaded = BatchNorm::<f64>::from_file(kind, &path, &ConfigOverrides::default()).unwrap();
        assert_eq!(loaded.kind(), kind);
        assert_eq!(loaded.running_mean(), bn1d.running_mean());
        assert_eq!(loaded.num_batches_tracked(), Some(1));
    }
    let pytorch = state_file::load(fixture("pytorch_bn8.safetensors")).unwrap();
    assert_eq!(BatchNorm::<f32>::recorded_kind(&pytorch), None, "PyTorch's files name no class");
}
