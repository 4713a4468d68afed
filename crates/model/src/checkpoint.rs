//! Safetensors checkpoints (one file, or shards named by `model.safetensors.index.json`), memory
//! mapped and read slice by slice: a tensor-parallel rank copies out only the rows or columns it
//! owns, converted to the compute dtype, so its resident weights are about 1/tp of the model.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use tessera_tensor::{DType, Storage, Tensor};

use crate::ModelError;

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset of the tensor's data in its file.
    start: usize,
}

/// The bytes of one safetensors file: mapped from disk, or built into the binary.
enum FileBytes {
    Mapped(Mmap),
    Static(&'static [u8]),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Static(s) => s,
        }
    }
}

/// An open checkpoint: its files mapped, its tensor table read and validated.
pub struct Checkpoint {
    files: Vec<(PathBuf, FileBytes)>,
    entries: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `DIR/model.safetensors`, or where there is none the shards of
    /// `DIR/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if !dir.is_dir() {
            return Err(ModelError::Checkpoint {
                path: dir.display().to_string(),
                msg: if dir.exists() {
                    "is not a directory".into()
                } else {
                    "does not exist".into()
                },
            });
        }
        // The single file first, as transformers looks for it first (a directory may keep a
        // stale index beside it).
        let paths: Vec<PathBuf> = if single.is_dir() {
            return Err(ck_err(&single, "is a directory, not a safetensors file"));
        } else if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io {
                path: index.display().to_string(),
                err: e,
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ck_err(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ck_err(&index, "has no `weight_map` object"))?;
            let mut files: Vec<String> = Vec::new();
            for f in map.values() {
                let f = f
                    .as_str()
                    .ok_or_else(|| ck_err(&index, "weight_map values must be file names"))?;
                if f.contains('/') || f.contains("..") {
                    return Err(ck_err(
                        &index,
                        format!("shard name {f:?} leaves the directory"),
                    ));
                }
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            if files.is_empty() {
                return Err(ck_err(&index, "its weight_map names no shard"));
            }
            files.sort();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            return Err(ModelError::Checkpoint {
                path: dir.display().to_string(),
                msg: "holds neither model.safetensors nor model.safetensors.index.json".into(),
            });
        };
        let mut bytes = Vec::with_capacity(paths.len());
        for path in paths {
            let file = File::open(&path).map_err(|e| ModelError::Io {
                path: path.display().to_string(),
                err: e,
            })?;
            // SAFETY: the file is opened read-only; a checkpoint rewritten while we read it would
            // be a user error that we cannot guard against with mmap or read alike.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io {
                path: path.display().to_string(),
                err: e,
            })?;
            bytes.push((path, FileBytes::Mapped(mmap)));
        }
        Self::index(bytes)
    }

    /// A checkpoint whose single safetensors file is built into the binary.
    pub fn from_static(name: &str, data: &'static [u8]) -> Result<Self, ModelError> {
        Self::index(vec![(PathBuf::from(name), FileBytes::Static(data))])
    }

    fn index(files: Vec<(PathBuf, FileBytes)>) -> Result<Self, ModelError> {
        let mut entries = HashMap::new();
        for (fi, (path, data)) in files.iter().enumerate() {
            let path = path.as_path();
            let (header, meta) = SafeTensors::read_metadata(data).map_err(|e| {
                ck_err(
                    path,
                    format!("not a valid safetensors file (truncated?): {e}"),
                )
            })?;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    StDtype::F32 => DType::F32,
                    StDtype::BF16 => DType::BF16,
                    StDtype::F16 => DType::F16,
                    other => {
                        return Err(ck_err(
                            path,
                            format!(
                            "tensor {name} has dtype {other:?}; tessera reads F32, BF16 and F16"
                        ),
                        ))
                    }
                };
                let entry = Entry {
                    file: fi,
                    dtype,
                    shape: info.shape.clone(),
                    start: 8 + header + info.data_offsets.0,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(ck_err(path, format!("tensor {name} appears in two shards")));
                }
            }
        }
        Ok(Checkpoint { files, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry, ModelError> {
        self.entries
            .get(name)
            .ok_or_else(|| ModelError::Checkpoint {
                path: self
                    .files
                    .first()
                    .map(|f| f.0.parent().unwrap_or(&f.0).display().to_string())
                    .unwrap_or_default(),
                msg: format!("tensor {name} is missing"),
            })
    }

    /// The tensor's shape, checked against what the config implies.
    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<(), ModelError> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(ck_err(
                &self.files[e.file].0,
                format!(
                    "tensor {name} has shape {:?}, the config implies {shape:?}",
                    e.shape
                ),
            ));
        }
        Ok(())
    }

    /// Rows `r0..r1` of `name` (a 2-D tensor, or elements of a 1-D one), in `dtype`.
    pub fn read_rows(
        &self,
        name: &str,
        shape: &[usize],
        r0: usize,
        r1: usize,
        dtype: DType,
    ) -> Result<Tensor, ModelError> {
        self.expect_shape(name, shape)?;
        let e = self.entry(name)?;
        let cols: usize = shape[1..].iter().product();
        let mut out_shape = shape.to_vec();
        out_shape[0] = r1 - r0;
        let mut dst = Storage::zeros(dtype, (r1 - r0) * cols);
        self.copy_elems(name, e, r0 * cols, (r1 - r0) * cols, &mut dst, 0)?;
        Ok(Tensor::new(out_shape, dst)?)
    }

    /// Columns `c0..c1` of the 2-D tensor `name`, in `dtype`.
    pub fn read_cols(
        &self,
        name: &str,
        shape: &[usize],
        c0: usize,
        c1: usize,
        dtype: DType,
    ) -> Result<Tensor, ModelError> {
        self.expect_shape(name, shape)?;
        let e = self.entry(name)?;
        let (rows, cols) = (shape[0], shape[1]);
        let w = c1 - c0;
        let mut dst = Storage::zeros(dtype, rows * w);
        for r in 0..rows {
            self.copy_elems(name, e, r * cols + c0, w, &mut dst, r * w)?;
        }
        Ok(Tensor::new(vec![rows, w], dst)?)
    }

    /// Copies `n` elements starting at element `from` of `e` (the tensor `name`) into `dst[at..]`,
    /// converting dtype. A number beyond what f16 holds (|x| > 65504, which would become inf and
    /// the logits NaN) is refused, naming the tensor and the dtypes that hold it.
    fn copy_elems(
        &self,
        name: &str,
        e: &Entry,
        from: usize,
        n: usize,
        dst: &mut Storage,
        at: usize,
    ) -> Result<(), ModelError> {
        let size = e.dtype.size_in_bytes();
        let bytes = &self.files[e.file].1[e.start + from * size..e.start + (from + n) * size];
        match (e.dtype, dst) {
            (DType::BF16, Storage::BF16(d)) => {
                for (x, b) in d[at..at + n].iter_mut().zip(bytes.chunks_exact(2)) {
                    *x = half::bf16::from_le_bytes([b[0], b[1]]);
                }
            }
            (DType::F16, Storage::F16(d)) => {
                for (x, b) in d[at..at + n].iter_mut().zip(bytes.chunks_exact(2)) {
                    *x = half::f16::from_le_bytes([b[0], b[1]]);
                }
            }
            (src, d) => {
                let mut buf = vec![0.0f32; n];
                for (x, b) in buf.iter_mut().zip(bytes.chunks_exact(size)) {
                    *x = match src {
                        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    };
                }
                if matches!(d, Storage::F16(_)) {
                    let too_big = |x: &f32| x.is_finite() && half::f16::from_f32(*x).is_infinite();
                    if let Some(i) = buf.iter().position(too_big) {
                        return Err(ck_err(
                            &self.files[e.file].0,
                            format!(
                                "{name} holds {} at element {}, beyond the range of f16; load it \
                                 as bf16 or f32 (--dtype)",
                                buf[i],
                                from + i
                            ),
                        ));
                    }
                }
                d.write_f32(at, &buf);
            }
        }
        Ok(())
    }
}

fn ck_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}
