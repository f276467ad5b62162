//! A GGUF (version 3) file writer: metadata key/values, tensor infos, and tensor data encoded as
//! F32, F16 or Q8_0, laid out as llama.cpp's `gguf-py` writes them.
//!
//! candle's `gguf_file::write` writes version 2 and hides its value encoder; llama.cpp and Ollama
//! read both, but the reference tools (`convert_hf_to_gguf.py`) write version 3 with an explicit
//! data alignment, and this project's exports should be byte-for-byte what those tools expect. So
//! the format is written here, reusing candle's [`Value`] as the metadata type (what the reader
//! side of the crate already speaks). Quantisation follows gguf-py's reference `Q8_0`: blocks of
//! 32 values, `d = max|x| / 127` stored as f16, `q = round(x / d)` as int8.

use std::io::{BufWriter, Seek, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use candle_core::quantized::gguf_file::Value;

/// `GGUF` in little-endian.
const MAGIC: u32 = 0x4655_4747;
const VERSION: u32 = 3;
/// The default alignment of tensor data (also written as `general.alignment`).
pub const ALIGNMENT: usize = 32;
/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// The tensor encodings this writer produces, with their ggml type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q8_0,
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
        }
    }
}

/// One tensor ready to write: its name, its shape in row-major (PyTorch/HF) order, and its
/// encoded bytes.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

impl GgufTensor {
    /// Encodes `t` (any float dtype, any device) as `ty`. Q8_0 needs a row length that is a
    /// multiple of 32: callers pick F16 otherwise (see [`GgufTensor::q8_0_or_f16`]).
    pub fn encode(name: impl Into<String>, t: &Tensor, ty: GgmlType) -> Result<Self> {
        let name = name.into();
        let shape = t.dims().to_vec();
        let values: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()
            .with_context(|| format!("reading tensor {name}"))?;
        let data = match ty {
            GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            GgmlType::Q8_0 => {
                let row = shape.last().copied().unwrap_or(0);
                if row == 0 || !row.is_multiple_of(Q8_0_BLOCK) {
                    bail!(
                        "tensor {name} has rows of {row} values; Q8_0 needs a multiple of {Q8_0_BLOCK}"
                    );
                }
                quantize_q8_0(&values)
            }
        };
        Ok(Self {
            name,
            shape,
            ty,
            data,
        })
    }

    /// Q8_0 when the row length allows it, else F16 (what llama.cpp's converter falls back to).
    pub fn q8_0_or_f16(name: impl Into<String>, t: &Tensor) -> Result<Self> {
        let row = t.dims().last().copied().unwrap_or(0);
        let ty = if row > 0 && row.is_multiple_of(Q8_0_BLOCK) {
            GgmlType::Q8_0
        } else {
            GgmlType::F16
        };
        Self::encode(name, t, ty)
    }
}

/// gguf-py's reference Q8_0: per block of 32, `d = max|x| / 127`, `q = round(x / d)` (half away
/// from zero), stored as `[d: f16][q: 32 × i8]` (34 bytes). An all-zero block has `d = 0, q = 0`.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * (2 + Q8_0_BLOCK));
    for block in values.chunks(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        for &x in block {
            let q = if d == 0.0 { 0.0 } else { (x / d).round() };
            out.push((q.clamp(-127.0, 127.0) as i8) as u8);
        }
    }
    out
}

/// A GGUF file being assembled: metadata in insertion order, then tensors in insertion order.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<GgufTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a metadata key.
    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
    }

    /// The metadata set so far, in insertion order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn add_tensor(&mut self, t: GgufTensor) {
        self.tensors.push(t);
    }

    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// Writes the file to `path` (through a temporary file renamed into place, so a killed
    /// export never leaves a truncated GGUF behind).
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("gguf.part");
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        self.write_to(&mut w)
            .with_context(|| format!("writing {}", tmp.display()))?;
        w.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    /// Header, metadata, tensor infos, padding, then every tensor's data padded to
    /// [`ALIGNMENT`].
    pub fn write_to<W: Write + Seek>(&self, w: &mut W) -> Result<()> {
        w.write_all(&MAGIC.to_le_bytes())?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (key, value) in &self.metadata {
            write_str(w, key)?;
            w.write_all(&value_type(value)?.to_le_bytes())?;
            write_value(w, value).with_context(|| format!("metadata key {key}"))?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(w, &t.name)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            // GGUF lists dimensions fastest-varying first (ggml's ne[0] is the row length).
            for d in t.shape.iter().rev() {
                w.write_all(&(*d as u64).to_le_bytes())?;
            }
            w.write_all(&t.ty.id().to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset += padded(t.data.len()) as u64;
        }
        let pos = w.stream_position()? as usize;
        w.write_all(&vec![0u8; padded(pos) - pos])?;
        for t in &self.tensors {
            w.write_all(&t.data)?;
            w.write_all(&vec![0u8; padded(t.data.len()) - t.data.len()])?;
        }
        Ok(())
    }
}

fn padded(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn write_str<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF's value type ids.
fn value_type(v: &Value) -> Result<u32> {
    Ok(match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    })
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes())?,
        Value::I8(x) => w.write_all(&x.to_le_bytes())?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[u8::from(*x)])?,
        Value::String(s) => write_str(w, s)?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Array(items) => {
            // An empty array still needs an element type; any will do.
            let ty = match items.first() {
                Some(first) => value_type(first)?,
                None => 4,
            };
            if let Some(other) = items.iter().find(|i| value_type(i).ok() != Some(ty)) {
                bail!("GGUF arrays hold one type; found {other:?} among type-{ty} values");
            }
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for item in items {
                write_value(w, item)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    use candle_core::{Device, Tensor};

    #[test]
    fn q8_0_blocks_match_candles_quantiser_and_read_back() {
        // Values chosen so that no x/d lands on a .5 tie, where x*(1/d) and x/d could differ.
        let vals: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 101) as f32 - 50.3) * 0.013)
            .collect();
        let t = Tensor::from_vec(vals.clone(), (2, 64), &Device::Cpu).unwrap();
        let ours = quantize_q8_0(&vals);
        let theirs = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        assert_eq!(ours.len(), 4 * 34);
        assert_eq!(ours, theirs.data().unwrap().to_vec());

        let mut w = GgufWriter::new();
        w.set("general.architecture", Value::String("llama".into()));
        w.set("general.alignment", Value::U32(32));
        w.set(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        );
        w.add_tensor(GgufTensor::encode("w.q8", &t, GgmlType::Q8_0).unwrap());
        w.add_tensor(GgufTensor::encode("w.f16", &t, GgmlType::F16).unwrap());
        let norm = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        w.add_tensor(GgufTensor::encode("n", &norm, GgmlType::F32).unwrap());
        let mut buf = std::io::Cursor::new(Vec::new());
        w.write_to(&mut buf).unwrap();

        buf.set_position(0);
        let content = gguf_file::Content::read(&mut buf).unwrap();
        assert!(matches!(content.magic, gguf_file::VersionedMagic::GgufV3));
        assert_eq!(content.tensor_infos["w.q8"].shape.dims(), &[2, 64]);
        for (name, tol) in [("w.q8", 0.66 * 0.013 / 127.0 * 64.0), ("w.f16", 1e-3)] {
            let back = content
                .tensor(&mut buf, name, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let err = (back - &t)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err <= tol, "{name}: max error {err} > {tol}");
        }
        let n = content
            .tensor(&mut buf, "n", &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(n.to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
    }

    #[test]
    fn q8_0_refuses_rows_that_are_not_whole_blocks() {
        let t = Tensor::zeros((4, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = GgufTensor::encode("x", &t, GgmlType::Q8_0).unwrap_err();
        assert!(e.to_string().contains("16"), "{e}");
        assert_eq!(GgufTensor::q8_0_or_f16("x", &t).unwrap().ty, GgmlType::F16);
        assert_eq!(quantize_q8_0(&[0.0; 32])[..2], [0, 0]);
    }
}
